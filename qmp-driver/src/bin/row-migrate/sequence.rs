//! The migration sequence: checks, disk pre-copy, QEMU's memory migration with
//! `pause-before-switchover`, the final disk round at `pre-switchover`, the switchover.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use control_api::{MigrateFinishArgs, MigrateStartArgs, NoArgs, Phase, QueryMigrate, StatusReply};
use qmp_driver::proxy::status;
use qmp_driver::{DiskMigration, Peer, Qmp, Support};
use serde_json::{json, Value};

use crate::budget::{
    auto_pace, drain_time, finals_predicted_ms, measured_link_rate, memory_share, paced_below, resume_share,
};
use crate::ctx::{all_ok, disks_value, each_disk, Ctx, DiskPair, Failure, CMD, TLS_OBJECT};
use crate::disks::{disk_name, disk_specs, proxy_flags, DiskSpec};
use crate::mirror::{mirror_complete, mirror_copy_mode, mirror_until_ready, parse_nbd_uri};
use crate::ram::{RamDecision, RamWatch};
use crate::report::{progress_detail, progress_done, progress_line};
use crate::{exit, Args, PostcopyArg, Strategy};

/// How long the final disk round (delivered and synced on the destination) may take.
const FINISH_TIMEOUT: Duration = Duration::from_secs(600);
/// How long QEMU's memory migration may go between two events.
const MIGRATION_EVENT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the destination guest may take to resume after the switchover.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);
fn refused(error: anyhow::Error) -> Failure {
    Failure { code: exit::REFUSED, error: error.context("nothing was changed"), state: Value::Null }
}

/// Runs the whole migration; a failure says how it ended (see [`exit`]).
pub async fn run(args: Args) -> Result<Value, Failure> {
    let mut ctx = connect_all(args).await?;
    preflight(&mut ctx).await.map_err(refused)?;
    let timeout = ctx.args.timeout;
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, migrate(&mut ctx)) => match r {
            Ok(r) => r,
            Err(_) => Err(anyhow!("the migration did not finish within {}", humantime::format_duration(timeout))),
        },
        _ = crate::ssh::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let error = match outcome {
        Ok(mut report) => {
            let after = tokio::select! {
                r = after_switchover(&mut ctx, &mut report) => r,
                _ = crate::ssh::ctrl_c() => Err(anyhow!("interrupted")),
            };
            match after {
                Ok(()) => return Ok(report),
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    Err(failed(&mut ctx, error).await)
}

/// Connects to both QEMUs and every disk's two proxies, after checking the arguments; any
/// failure is a refusal (nothing was changed).
async fn connect_all(mut args: Args) -> Result<Ctx, Failure> {
    let specs = disk_specs(&args).map_err(|e| refused(anyhow!(e)))?;
    distinct_sockets(&args, &specs).map_err(refused)?;
    check_args(&mut args, &specs).map_err(refused)?;
    let src = connect(args.src_qmp(), "--src-qmp".into(), "source QEMU", Peer::Qemu).await.map_err(refused)?;
    let dst = connect(args.dst_qmp(), "--dst-qmp".into(), "destination QEMU", Peer::Qemu).await.map_err(refused)?;
    let count = specs.len();
    let mut disks = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let name = disk_name(i, count);
        let (src_flag, dst_flag) = proxy_flags(&args, i);
        let src_proxy = connect(&spec.src_proxy, src_flag, "source proxy", Peer::Proxy)
            .await
            .context(name.clone())
            .map_err(refused)?;
        let dst_proxy = connect(&spec.dst_proxy, dst_flag, "destination proxy", Peer::Proxy)
            .await
            .context(name.clone())
            .map_err(refused)?;
        disks.push(DiskPair { spec, src_proxy, dst_proxy, started: false, block_size: 0, name });
    }
    Ok(Ctx {
        args,
        src,
        dst,
        disks,
        started: Instant::now(),
        mem_started: false,
        mirror_started: false,
        finish_sent: false,
        continue_sent: false,
        ram_postcopy: PostcopyArg::Never,
        ram_switched: None,
        block_job_change: false,
    })
}

/// One QMP connection (`flag` and `what` name it in errors; a timeout suggests the socket's one
/// client is someone else, e.g. libvirt).
async fn connect(path: &std::path::Path, flag: String, what: &str, peer: Peer) -> Result<Qmp> {
    Qmp::connect_to(path, CMD, peer).await.map_err(|e| {
        let busy = if e.is_timeout() {
            " (a QMP socket serves one client at a time: is another one, e.g. libvirt, connected?)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!("{flag} {}: cannot reach the {what}{busy}", path.display()))
    })
}

/// The migration failed with `error`: before `migrate-continue` everything is rolled back (exit
/// 3, or 4 if that failed too); after it nothing is undone and the failure says where the guest is.
async fn failed(ctx: &mut Ctx, error: anyhow::Error) -> Failure {
    if ctx.continue_sent {
        let state = crate::rollback::states(ctx).await;
        let on_destination = state["destination-qemu"]["status"] == "running";
        let (code, what) = if on_destination {
            (exit::AFTER_SWITCHOVER, "after the switchover: the guest runs on the destination; nothing was undone")
        } else {
            (
                exit::ROLLBACK_FAILED,
                "after the switchover was requested, and the destination guest does not run: nothing was undone and \
                 the source guest was not resumed; run row-migrate --recover with the same sockets",
            )
        };
        return Failure { code, error: error.context(what), state };
    }
    let undone = crate::rollback::rollback(ctx).await;
    let state = crate::rollback::states(ctx).await;
    match undone {
        Ok(()) => Failure {
            code: exit::ROLLED_BACK,
            error: error.context("rolled back: the guest keeps running on the source with its disk"),
            state,
        },
        Err(r) => Failure {
            code: exit::ROLLBACK_FAILED,
            error: error.context(format!("and the rollback failed: {r:#}")),
            state,
        },
    }
}

/// The QMP sockets must differ from each other and from every control socket (the disks'
/// control sockets are checked against each other by `disk_specs`): a QMP socket serves one
/// client at a time, so a path given twice would otherwise wait for itself until the timeout.
fn distinct_sockets(args: &Args, specs: &[DiskSpec]) -> Result<()> {
    let same = |a: &std::path::Path, b: &std::path::Path| {
        a == b || std::fs::canonicalize(a).is_ok_and(|p| std::fs::canonicalize(b).is_ok_and(|q| p == q))
    };
    if same(args.src_qmp(), args.dst_qmp()) {
        bail!(
            "--src-qmp and --dst-qmp are the same socket ({}): each names a different QEMU",
            args.src_qmp().display()
        );
    }
    for (qmp_flag, qmp) in [("--src-qmp", args.src_qmp()), ("--dst-qmp", args.dst_qmp())] {
        for (i, spec) in specs.iter().enumerate() {
            let (src_flag, dst_flag) = proxy_flags(args, i);
            for (flag, path) in [(src_flag, &spec.src_proxy), (dst_flag, &spec.dst_proxy)] {
                if same(qmp, path) {
                    bail!(
                        "{qmp_flag} and {flag} are the same socket ({}): each names a different component",
                        qmp.display()
                    );
                }
            }
        }
    }
    Ok(())
}

/// The files of a TLS credentials directory QEMU's `tls-creds-x509` objects load: the source
/// QEMU is the client, the destination QEMU the server, and each verifies the other.
pub const TLS_FILES: [&str; 5] =
    ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"];

/// Checks the flags that need no component, before any is contacted: `--mem-uri` is a
/// `tcp:HOST:PORT`, qemu-mirror's `--disk-uri` an `nbd://HOST:PORT/EXPORT`, and `--tls-creds` a
/// directory with every file QEMU loads (made absolute here: QEMU resolves a relative path
/// against its own working directory, not row-migrate's).
fn check_args(args: &mut Args, specs: &[DiskSpec]) -> Result<()> {
    parse_tcp_uri(args.mem_uri()).context("--mem-uri")?;
    if !args.strategy.by_proxies() {
        for spec in specs {
            parse_nbd_uri(&spec.uri)?;
        }
    }
    if let Some(dir) = &args.tls_creds {
        args.tls_creds = Some(tls_dir(dir)?);
    }
    Ok(())
}

/// `tcp:HOST:PORT` (an IPv6 address in brackets, QEMU's options after a comma): the host and
/// the port.
pub fn parse_tcp_uri(uri: &str) -> Result<(String, u16)> {
    let expected = "expected tcp:HOST:PORT, e.g. tcp:host-b:4444";
    let rest =
        uri.strip_prefix("tcp:").ok_or_else(|| anyhow!("{uri:?}: {expected} (QEMU's memory stream goes over TCP)"))?;
    let rest = rest.split_once(',').map_or(rest, |(address, _options)| address);
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| anyhow!("{uri:?}: no port; {expected}"))?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']').ok_or_else(|| anyhow!("{uri:?}: unbalanced [; {expected}"))?,
        None if host.contains(':') => bail!("{uri:?}: an IPv6 address goes in brackets, e.g. tcp:[::1]:4444"),
        None => host,
    };
    if host.is_empty() {
        bail!("{uri:?}: no host; {expected}");
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow!("{uri:?}: {port:?} is no port (1 to 65535)"))?;
    Ok((host.to_string(), port))
}

/// `--tls-creds DIR`: the directory, absolute, once it holds every file of [`TLS_FILES`].
fn tls_dir(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let abs = std::fs::canonicalize(dir).map_err(|e| anyhow!("--tls-creds {}: {e}", dir.display()))?;
    if !abs.is_dir() {
        bail!("--tls-creds {}: not a directory", dir.display());
    }
    let missing: Vec<&str> = TLS_FILES.iter().copied().filter(|f| !abs.join(f).is_file()).collect();
    if !missing.is_empty() {
        bail!(
            "--tls-creds {}: no {} in it (QEMU's TLS credentials need {})",
            dir.display(),
            missing.join(", "),
            TLS_FILES.join(", ")
        );
    }
    Ok(abs)
}

/// The id of the credentials object the preflight loads and removes at once, to learn whether
/// each QEMU can read `--tls-creds`.
const TLS_CHECK_OBJECT: &str = "rowmig-tls-check";

/// Has each QEMU load the TLS credentials (and drops them again): a directory it cannot read
/// (another host's path, permissions) is refused before anything starts.
async fn check_tls(ctx: &mut Ctx) -> Result<()> {
    let Some(dir) = ctx.args.tls_creds.clone() else { return Ok(()) };
    for (qemu, who, endpoint) in
        [(&mut ctx.src, "the source QEMU", "client"), (&mut ctx.dst, "the destination QEMU", "server")]
    {
        let object = json!({ "qom-type": "tls-creds-x509", "id": TLS_CHECK_OBJECT, "dir": dir,
                             "endpoint": endpoint, "verify-peer": true });
        let added = qemu.execute_raw("object-add", object).await;
        if added.is_ok() {
            qemu.execute_raw("object-del", json!({ "id": TLS_CHECK_OBJECT }))
                .await
                .with_context(|| format!("object-del {TLS_CHECK_OBJECT} on {who}"))?;
        }
        added.map_err(|e| anyhow!("--tls-creds {}: {who} cannot load them as a TLS {endpoint}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Checks both sides before anything changes.
async fn preflight(ctx: &mut Ctx) -> Result<()> {
    let src_status = ctx.src.query_status().await.context("query-status on the source QEMU")?;
    if src_status.status != "running" {
        bail!("the source guest is not running (status {})", src_status.status);
    }
    let dst_status = ctx.dst.query_status().await.context("query-status on the destination QEMU")?;
    if dst_status.status != "inmigrate" {
        bail!(
            "the destination QEMU is not waiting for a migration (status {}; start it with -incoming defer)",
            dst_status.status
        );
    }
    if !ctx.args.strategy.by_proxies() && ctx.disks.len() > 1 {
        bail!("qemu-mirror moves one disk; use --strategy row or bitmap for a VM with several");
    }
    check_features(ctx).await?;
    check_tls(ctx).await?;
    check_drive_count(ctx).await?;
    let by_proxies = ctx.args.strategy.by_proxies();
    for disk in &mut ctx.disks {
        check_disk(disk, by_proxies).await.with_context(|| disk.name.clone())?;
    }
    Ok(())
}

/// The migration capabilities row-migrate turns on, per side (all required).
const SRC_CAPABILITIES: [&str; 2] = ["events", "pause-before-switchover"];
const DST_CAPABILITIES: [&str; 2] = ["events", "late-block-activate"];

/// Refuses, before anything changes, a QEMU whose QMP schema lacks what row-migrate will send
/// it (a capability, a migration parameter, the mirror's copy mode): decided by what each QEMU
/// says it accepts, not by its version, which only goes into the messages.
async fn check_features(ctx: &mut Ctx) -> Result<()> {
    let mirror_mode = (!ctx.args.strategy.by_proxies()).then(|| mirror_copy_mode(ctx.args.mirror_copy_mode));
    let tls: &[&str] = if ctx.args.tls_creds.is_some() { &["tls-creds"] } else { &[] };
    let src_params = [&["downtime-limit", "max-bandwidth"][..], tls].concat();
    // Memory follows the disk's --postcopy, but `always` for the disk means `auto` for memory:
    // a guest whose every page is fetched over a link busy with the disk's push stalls for
    // seconds (3.6 s writes at 20 Mbit/s), so memory switches only when it must.
    let ram_mode = ctx.args.ram_postcopy.unwrap_or(match ctx.args.postcopy {
        PostcopyArg::Never => PostcopyArg::Never,
        _ => PostcopyArg::Auto,
    });
    let ctx_auto_converge = ctx.args.auto_converge;
    let mut ram_offered = true;
    let mut block_job_change = false;
    for (qemu, who, caps, params) in [
        (&mut ctx.src, "the source QEMU", SRC_CAPABILITIES, src_params),
        (&mut ctx.dst, "the destination QEMU", DST_CAPABILITIES, tls.to_vec()),
    ] {
        let features = qemu.features().await.with_context(|| format!("query-qmp-schema on {who}"))?;
        tracing::debug!("{who}: QEMU {}", features.version);
        for deprecated in features.require_capabilities(who, &caps).map_err(|e| anyhow!(e))? {
            tracing::warn!("{who} (QEMU {}) marks the migration capability {deprecated} deprecated", features.version);
        }
        for p in params {
            if features.parameter(p) == Support::No {
                bail!("{who} (QEMU {}) has no migration parameter {p} (migrate-set-parameters)", features.version);
            }
        }
        if ram_mode != PostcopyArg::Never && features.capability("postcopy-ram") == Support::No {
            if ram_mode == PostcopyArg::Always {
                bail!("{who} (QEMU {}) has no postcopy-ram capability (--ram-postcopy always)", features.version);
            }
            tracing::warn!(
                "{who} (QEMU {}) has no postcopy-ram: memory will not switch to post-copy",
                features.version
            );
            ram_offered = false;
        }
        if ctx_auto_converge && who == "the source QEMU" && features.capability("auto-converge") == Support::No {
            bail!("{who} (QEMU {}) has no auto-converge capability", features.version);
        }
        if who == "the source QEMU" {
            block_job_change = features.block_job_change();
        }
        if let Some(mode) = mirror_mode.filter(|_| who == "the source QEMU") {
            if !features.mirror_copy_modes.contains(mode) {
                bail!("{who} (QEMU {}) has no blockdev-mirror copy-mode {mode}", features.version);
            }
        }
    }
    ctx.ram_postcopy = if ram_offered { ram_mode } else { PostcopyArg::Never };
    ctx.block_job_change = block_job_change;
    Ok(())
}

/// Refuses a run that would leave one of the guest's writable drives behind: the destination
/// QEMU would start on a disk nobody moved.
async fn check_drive_count(ctx: &mut Ctx) -> Result<()> {
    let blocks = ctx.src.execute_raw("query-block", json!({})).await.context("query-block on the source QEMU")?;
    let writable: Vec<String> = blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["inserted"].is_object() && b["inserted"]["ro"] != json!(true))
        .map(|b| b["qdev"].as_str().or(b["device"].as_str()).unwrap_or("?").to_string())
        .collect();
    if writable.len() > ctx.disks.len() && !ctx.args.allow_unmoved_drives {
        bail!(
            "the source guest has {} writable drives ({}) but {} disk(s) were given: give --disk for each, or \
             --allow-unmoved-drives if the others are on shared storage",
            writable.len(),
            writable.join(", "),
            ctx.disks.len()
        );
    }
    Ok(())
}

/// One disk's proxies: same size, the source owns its disk and is idle, the destination waits.
async fn check_disk(disk: &mut DiskPair, by_proxies: bool) -> Result<()> {
    let sp: StatusReply = status(&mut disk.src_proxy).await.context("query-status on the source proxy")?;
    let dp: StatusReply = status(&mut disk.dst_proxy).await.context("query-status on the destination proxy")?;
    disk.block_size = sp.block_size;
    if sp.image_size != dp.image_size {
        bail!("disk sizes differ: source {} bytes, destination {} bytes", sp.image_size, dp.image_size);
    }
    if let Some(why) = &sp.writes_refused {
        bail!("the source proxy refuses writes ({why}): its disk is not this host's to migrate");
    }
    if by_proxies {
        if !dp.incoming {
            let what = match dp.incoming_phase {
                Some(phase) => format!("a `receive` proxy that already holds a migrated disk (incoming phase {phase})"),
                None => format!("a `serve` proxy (mode {})", json!(dp.mode).as_str().unwrap_or("?")),
            };
            bail!("the destination proxy is not waiting for a disk: it is {what}; start `nbd-row-proxy receive` there");
        }
        if let Some(why) = protection_mismatch(&sp.protection, &dp.protection) {
            bail!("{why}");
        }
        let m = disk.src_proxy.call::<QueryMigrate>(NoArgs {}).await?;
        if m.phase.is_active() {
            bail!("the source proxy is already migrating (phase {})", m.phase);
        }
    } else if dp.incoming || dp.incoming_phase.is_some() {
        let phase = dp.incoming_phase.map_or_else(String::new, |p| format!(" (incoming phase {p})"));
        bail!(
            "for qemu-mirror the destination proxy must be a plain `serve` with --tcp; it is a `receive` proxy{phase}"
        );
    }
    Ok(())
}

/// Why two proxies (their `query-status` `protection`) cannot start a session: the stream
/// needs the same protection on both ends (TLS on both or neither; the key on both or neither).
/// Proxies too old to say are not judged.
fn protection_mismatch(src: &str, dst: &str) -> Option<String> {
    const NONE: &str = "none";
    if src.is_empty() || dst.is_empty() {
        return None;
    }
    if src.starts_with(NONE) {
        return Some(format!(
            "the source proxy has no protection for the migration stream: give it credentials or a key \
             (reload-protection, without a restart); the destination has {dst}"
        ));
    }
    (src != dst).then(|| {
        format!(
            "the proxies protect the migration stream differently (source: {src}; destination: {dst}): give both \
             the same --tls-creds/--auth-key-file kind (reload-protection changes it without a restart)"
        )
    })
}

/// Adds QEMU's `tls-creds-x509` object to a QEMU (replacing one left by an earlier run).
async fn add_tls_object(qemu: &mut Qmp, dir: &std::path::Path, endpoint: &str) -> Result<()> {
    let _ = qemu.execute_raw("object-del", json!({ "id": TLS_OBJECT })).await;
    qemu.execute_raw(
        "object-add",
        json!({ "qom-type": "tls-creds-x509", "id": TLS_OBJECT, "dir": dir, "endpoint": endpoint, "verify-peer": true }),
    )
    .await
    .with_context(|| format!("adding TLS credentials from {} ({endpoint})", dir.display()))?;
    Ok(())
}

async fn migrate(ctx: &mut Ctx) -> Result<Value> {
    if let Some(dir) = ctx.args.tls_creds.clone() {
        add_tls_object(&mut ctx.src, &dir, "client").await.context("on the source QEMU")?;
        add_tls_object(&mut ctx.dst, &dir, "server").await.context("on the destination QEMU")?;
    }
    let disk_done =
        if ctx.args.strategy.by_proxies() { precopy_disk(ctx).await? } else { mirror_until_ready(ctx).await? };
    let precopy_seconds = ctx.started.elapsed().as_secs_f64();
    let memory = start_memory(ctx, &disk_done).await?;
    progress_line("memory", "copying RAM");
    let stop = wait_memory_copy(ctx).await?;
    progress_done();
    let paused_at = Instant::now();
    // The guest is paused and its block layer flushed: everything from here is downtime.
    // qemu-mirror's --verify-disk compares both disks before the switchover: the destination
    // must hold all.
    let paused_check = ctx.args.verify_disk && !ctx.args.strategy.by_proxies();
    let postcopy = if paused_check { PostcopyArg::Never } else { ctx.args.postcopy };
    let resume_margin = memory.resume_margin(ctx.args.downtime_limit);
    let disk_budget = ctx.args.downtime_limit.saturating_sub(memory.limit + resume_margin + paused_at.elapsed());
    let finish_args =
        MigrateFinishArgs { postcopy: Some(postcopy.mode()), budget_ms: Some(disk_budget.as_millis() as u64) };
    let final_disk = if ctx.args.strategy.by_proxies() {
        final_disk_round(ctx, finish_args).await?
    } else {
        mirror_complete(ctx).await?
    };
    let final_disk_seconds = paused_at.elapsed().as_secs_f64();
    let verify_started = Instant::now();
    let verified = if paused_check { Some(crate::verify::while_paused(ctx).await?) } else { None };
    let verify_seconds = if verified.is_some() { verify_started.elapsed().as_secs_f64() } else { 0.0 };
    let resume = switch_over(ctx).await?;
    let mem = ctx.src.query_migrate().await.context("query-migrate on the source")?;
    let downtime = secs(&resume.timestamp) - secs(&stop);
    let disk = if ctx.args.strategy.by_proxies() { final_disk } else { disk_done };
    let predicted_disk_ms = finals_predicted_ms(&disk, disk_budget);
    Ok(json!({
        "strategy": ctx.args.strategy.name(),
        "disk-count": ctx.disks.len(),
        "total-seconds": ctx.started.elapsed().as_secs_f64(),
        "switchover-seconds": ctx.started.elapsed().as_secs_f64(),
        "disk-precopy-seconds": precopy_seconds,
        "downtime-ms": downtime * 1000.0,
        "downtime-limit-ms": ctx.args.downtime_limit.as_secs_f64() * 1000.0,
        "disk-budget-ms": disk_budget.as_secs_f64() * 1000.0,
        "predicted-downtime-ms": predicted_disk_ms + (memory.limit + resume_margin).as_secs_f64() * 1000.0,
        "postcopy": false,
        "final-disk-round-ms": final_disk_seconds * 1000.0,
        "memory-stop-and-copy-ms": ((downtime - final_disk_seconds - verify_seconds) * 1000.0).max(0.0),
        "verify-disk-ms": verify_seconds * 1000.0,
        "qemu-reported-downtime-ms": mem.downtime_ms(),
        "memory-bytes": mem.ram_transferred(),
        "memory-max-bandwidth": memory.rate,
        "memory-paced": memory.paced_by(),
        "ram-postcopy": ctx.ram_switched.as_ref().map(|(why, left)| json!({ "reason": why, "remaining-bytes": left })),
        "memory-total-time-ms": mem.total_time_ms(),
        "disk": disk,
        "disk-verified": verified,
    }))
}

/// How QEMU's memory migration was set up: its share of the downtime budget and its pace.
struct Memory {
    /// QEMU's `downtime-limit`.
    limit: Duration,
    /// The link's rate as the disks' round 1 measured it.
    link_rate: Option<f64>,
    /// QEMU's `max-bandwidth` (None: unlimited).
    rate: Option<u64>,
    /// Whether row-migrate chose that pace (the operator gave no --max-bandwidth).
    auto_paced: bool,
}

impl Memory {
    /// What follows QEMU's own count: the resume's share, or longer on a slow link whose queue
    /// holds the end of an unpaced stream; warns when memory and that alone exceed the budget.
    fn resume_margin(&self, limit: Duration) -> Duration {
        let drain = if paced_below(self.rate, self.link_rate) { Duration::ZERO } else { drain_time(self.link_rate) };
        let margin = resume_share(limit).max(drain);
        if self.limit + margin > limit {
            tracing::warn!(
                "the downtime budget ({} ms) cannot be met at this link rate ({:.1} MB/s): memory's stop-and-copy \
                 ({} ms) and draining its stream to the destination (about {} ms) alone exceed it; the disk's whole \
                 final round goes to the post-copy unless --postcopy never; a --max-bandwidth below the link's \
                 rate keeps the link's queue short",
                limit.as_millis(),
                self.link_rate.unwrap_or(0.0) / 1e6,
                self.limit.as_millis(),
                margin.as_millis()
            );
        }
        margin
    }

    /// The report's `memory-paced`.
    fn paced_by(&self) -> Value {
        match (self.auto_paced, self.rate) {
            (true, _) => json!("auto"),
            (false, Some(_)) => json!("operator"),
            (false, None) => Value::Null,
        }
    }
}

/// Starts QEMU's memory migration: pause before switchover on the source, late block
/// activation on the destination (both schemas were checked in the preflight), RAM post-copy
/// where it may be used, QEMU's share of the budget and its pace (the operator's, or a tenth
/// below a slow link).
async fn start_memory(ctx: &mut Ctx, disk_done: &Value) -> Result<Memory> {
    let src_caps: Vec<_> = SRC_CAPABILITIES
        .map(|c| (c, true))
        .into_iter()
        .chain(ctx.args.auto_converge.then_some(("auto-converge", true)))
        .collect();
    ctx.src.migrate_set_capabilities(&src_caps).await?;
    ctx.dst.migrate_set_capabilities(&DST_CAPABILITIES.map(|c| (c, true))).await?;
    enable_ram_postcopy(ctx).await?;
    let limit = memory_share(ctx.args.downtime_limit);
    let link_rate = measured_link_rate(disk_done);
    let auto_paced = ctx.args.max_bandwidth.is_none().then(|| auto_pace(link_rate, ctx.args.downtime_limit)).flatten();
    let rate = ctx.args.max_bandwidth.or(auto_paced);
    if let Some(pace) = auto_paced {
        tracing::info!(
            pace_mb_s = pace as f64 / 1e6,
            link_mb_s = link_rate.unwrap_or_default() / 1e6,
            "pacing QEMU's memory stream below the link (its queue would otherwise hold the stream's end past the \
             resume's share of the downtime budget)"
        );
    }
    // Unlimited unless paced (QEMU's default is 128 MiB/s; libvirt sets it unlimited too).
    let mut params =
        json!({ "downtime-limit": limit.as_millis() as u64, "max-bandwidth": rate.unwrap_or(u64::MAX >> 20) });
    if ctx.args.tls_creds.is_some() {
        params["tls-creds"] = json!(TLS_OBJECT);
        ctx.dst
            .migrate_set_parameters(json!({ "tls-creds": TLS_OBJECT }))
            .await
            .context("migrate-set-parameters tls-creds on the destination")?;
    }
    ctx.src.migrate_set_parameters(params).await.context("migrate-set-parameters")?;
    ctx.dst.migrate_incoming(ctx.args.mem_uri()).await.context("migrate-incoming on the destination")?;
    ctx.mem_started = true;
    ctx.src.migrate(ctx.args.mem_uri()).await.context("migrate on the source")?;
    Ok(Memory { limit, link_rate, rate, auto_paced: auto_paced.is_some() })
}

/// Every disk's final round at once (the switchover needs every commit); the destination
/// proxies are asked once more after their commit.
async fn final_disk_round(ctx: &mut Ctx, finish_args: MigrateFinishArgs) -> Result<Value> {
    ctx.finish_sent = true;
    let results = each_disk(&mut ctx.disks, |d| {
        let finish_args = finish_args.clone();
        async move {
            let r = async {
                let r = DiskMigration { source: &mut d.src_proxy }.finish(finish_args, FINISH_TIMEOUT).await?;
                status(&mut d.dst_proxy).await.context("the destination proxy after the commit")?;
                Ok(serde_json::to_value(r)?)
            }
            .await;
            (d.name.clone(), r)
        }
    })
    .await;
    let finals = all_ok(results).context("the final disk round failed")?;
    Ok(disks_value(finals))
}

/// `migrate-continue`: from the moment it is sent the switchover may happen, and nothing is
/// undone. Returns the destination's RESUME event (a RAM post-copy completes later:
/// after_switchover waits for it).
async fn switch_over(ctx: &mut Ctx) -> Result<qmp_driver::QemuEvent> {
    ctx.continue_sent = true;
    pause("before-continue").await;
    ctx.src.migrate_continue("pre-switchover").await.context("migrate-continue")?;
    wait_migration(&mut ctx.src, if ctx.ram_switched.is_some() { "postcopy-active" } else { "completed" }).await?;
    ctx.dst.wait_event(RESUME_TIMEOUT, |e| e.name == "RESUME").await.context("the destination guest did not resume")
}

/// After the switchover (the guest runs on the destination; nothing can be undone): waits for
/// every post-copy to end, then completes every disk migration. Not bounded by `--timeout`: a
/// post-copy moves what the guest wrote faster than the link, and it ends when that is moved.
pub async fn after_switchover(ctx: &mut Ctx, report: &mut Value) -> Result<()> {
    if ctx.ram_switched.is_some() {
        let started = Instant::now();
        let mem = wait_ram_postcopy(ctx).await?;
        let pc = &mut report["ram-postcopy"];
        pc["seconds"] = json!(started.elapsed().as_secs_f64());
        pc["page-requests"] = json!(mem.ram("postcopy-requests"));
        report["memory-bytes"] = json!(mem.ram_transferred());
        report["qemu-reported-downtime-ms"] = json!(mem.downtime_ms());
    }
    if !ctx.args.strategy.by_proxies() {
        return Ok(());
    }
    let switched = Instant::now();
    let postcopy = wait_postcopy(ctx, switched).await?;
    pause("before-complete").await;
    for d in &mut ctx.disks {
        DiskMigration { source: &mut d.src_proxy }
            .complete()
            .await
            .with_context(|| format!("migrate-complete ({})", d.name))?;
    }
    for (i, p) in postcopy.iter().enumerate() {
        match &mut report["disk"] {
            Value::Array(all) => all[i]["postcopy"] = p.clone(),
            one => one["postcopy"] = p.clone(),
        }
    }
    report["postcopy"] = json!(!postcopy.is_empty());
    if ctx.args.verify_disk {
        report["disk-verified"] = crate::verify::after_switchover(ctx).await.context("--verify-disk")?;
    }
    report["total-seconds"] = json!(ctx.started.elapsed().as_secs_f64());
    Ok(())
}

/// After the switchover: waits until every post-copy is over (the destinations hold every
/// block), showing its progress; a destination guest that paused on a read error while the
/// link was down is resumed once the push runs again. Returns each post-copy disk's figures.
async fn wait_postcopy(ctx: &mut Ctx, switched: Instant) -> Result<Vec<Value>> {
    let mut figures = vec![Value::Null; ctx.disks.len()];
    let mut any = false;
    loop {
        let mut running = false;
        let mut stalled = false;
        for (i, d) in ctx.disks.iter_mut().enumerate() {
            let s = DiskMigration { source: &mut d.src_proxy }
                .status()
                .await
                .with_context(|| format!("the source proxy ({})", d.name))?;
            let Some(p) = s.postcopy else { continue };
            any = true;
            stalled |= p.stalled.is_some();
            if p.done {
                if figures[i].is_null() {
                    let dst = status(&mut d.dst_proxy).await.ok().and_then(|s| s.postcopy);
                    let mut v = serde_json::to_value(&p)?;
                    v["seconds"] = json!(switched.elapsed().as_secs_f64());
                    v["bytes"] = json!(dst.as_ref().map(|x| x.received_bytes));
                    v["fetch-count"] = json!(dst.as_ref().map(|x| x.waits));
                    v["fetch-max-ms"] = json!(dst.as_ref().map(|x| x.wait_max_ms));
                    v["fetch-mean-ms"] = json!(dst.as_ref().map(|x| x.wait_mean_ms));
                    figures[i] = v;
                }
                continue;
            }
            running = true;
            let total = p.blocks.max(p.remaining_blocks) * d.block_size.max(1);
            let done = total - p.remaining_blocks * d.block_size.max(1);
            let what = match &p.stalled {
                Some(why) => format!("link down, reconnecting: {why}"),
                None => progress_detail(done, total, s.rate),
            };
            progress_line(&format!("{} post-copy", d.name), &what);
        }
        if !running {
            progress_done();
            return Ok(if any { figures.into_iter().filter(|v| !v.is_null()).collect() } else { Vec::new() });
        }
        // A read error while the link was down pauses the guest (rerror=stop); once the push
        // runs again its reads can be answered.
        if !stalled {
            let st = ctx.dst.execute_raw("query-status", json!({})).await?;
            if st["status"] == "io-error" {
                tracing::warn!("the destination guest paused on a disk error while the link was down: resuming it");
                ctx.dst.execute_raw("cont", json!({})).await.context("cont on the destination")?;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Starts every disk's pre-copy rounds (they share `--max-bandwidth` equally) and follows them
/// until all are `ready`.
async fn precopy_disk(ctx: &mut Ctx) -> Result<Value> {
    let strategy = match ctx.args.strategy {
        Strategy::Bitmap => control_api::Strategy::Bitmap,
        _ => control_api::Strategy::Row,
    };
    let share = ctx.args.max_bandwidth.map(|b| (b / ctx.disks.len() as u64).max(1));
    for d in &mut ctx.disks {
        let mut args = MigrateStartArgs::new(d.spec.uri.clone(), strategy);
        args.rounds = ctx.args.rounds;
        args.hot_threshold = ctx.args.hot_threshold;
        args.max_bandwidth = share;
        d.started = true;
        DiskMigration { source: &mut d.src_proxy }
            .start(args)
            .await
            .with_context(|| format!("migrate-start on the source proxy ({})", d.name))?;
    }
    let results = each_disk(&mut ctx.disks, |d| async move {
        let (block_size, name) = (d.block_size, d.name.clone());
        let ready = DiskMigration { source: &mut d.src_proxy }
            .wait_ready(|m| {
                let kind = if m.rounds.is_empty() { "base" } else { "update" };
                let total = m.round_blocks.max(m.round_remaining_blocks) * block_size;
                let done = total - m.round_remaining_blocks * block_size;
                progress_line(
                    &format!("{name} round {}", m.round),
                    &format!("{kind}: {}", progress_detail(done, total, m.rate)),
                );
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|ready| {
                if ready.phase != Phase::Ready {
                    bail!("the disk migration ended in phase {}", ready.phase);
                }
                Ok(serde_json::to_value(ready)?)
            });
        (d.name.clone(), ready)
    })
    .await;
    progress_done();
    Ok(disks_value(all_ok(results)?))
}

/// How often the memory copy is checked for progress and the disk migration for failure.
const MEMORY_WATCH_EVERY: Duration = Duration::from_secs(1);

/// Waits for the memory migration to reach `pre-switchover` (returns the STOP event's time),
/// while checking that it moves (RAM transferred grows within `--stall-timeout`) and that the
/// disk migration has not failed meanwhile: on a dead link QEMU would only notice when TCP gives
/// up, and the guest must not be left waiting on a migration that can no longer finish.
async fn wait_memory_copy(ctx: &mut Ctx) -> Result<qmp_proto::Timestamp> {
    let mut stop = None;
    let mut moved = (None, Instant::now());
    let mut ram = RamWatch::new(ctx.ram_postcopy, memory_share(ctx.args.downtime_limit));
    let mut sampled = Instant::now();
    loop {
        if let Some(e) = ctx.src.next_event(MEMORY_WATCH_EVERY).await? {
            match e.name.as_str() {
                "STOP" => stop = Some(e.timestamp),
                "MIGRATION" => match e.data["status"].as_str().unwrap_or_default() {
                    "pre-switchover" => return Ok(stop.unwrap_or(e.timestamp)),
                    s @ ("failed" | "cancelled" | "cancelling") => {
                        let info = ctx.src.query_migrate().await?;
                        bail!("QEMU's memory migration {s}: {}", info.error_desc().unwrap_or("no reason given"));
                    }
                    _ => {}
                },
                _ => {}
            }
            // Events can come faster than a second (a MIGRATION_PASS per pass near the end of a
            // copy that does not converge): sample by the clock, not only when none came.
            if sampled.elapsed() < MEMORY_WATCH_EVERY {
                continue;
            }
        }
        sampled = Instant::now();
        let info = ctx.src.query_migrate().await?;
        let transferred = info.ram_transferred();
        if let (Some(done), Some(left)) = (transferred, info.ram_remaining()) {
            let rate = match moved.0 {
                Some(before) if done > before => (done - before) as f64 / moved.1.elapsed().as_secs_f64().max(0.001),
                _ => 0.0,
            };
            progress_line("memory", &progress_detail(done, done + left, rate));
            if let RamDecision::StartPostcopy(why) = ram.sample(info.ram("dirty-sync-count").unwrap_or(0), left, rate) {
                tracing::info!("memory switches to post-copy: {why}");
                ctx.src.execute_raw("migrate-start-postcopy", json!({})).await.context("migrate-start-postcopy")?;
                ctx.ram_switched = Some((why, left));
            }
        }
        if transferred != moved.0 {
            moved = (transferred, Instant::now());
        } else if moved.1.elapsed() >= ctx.args.stall_timeout {
            bail!(
                "QEMU's memory migration moved no byte for {} (is the link to the destination down?)",
                humantime::format_duration(ctx.args.stall_timeout)
            );
        }
        if ctx.args.strategy.by_proxies() {
            for d in &mut ctx.disks {
                let disk = DiskMigration { source: &mut d.src_proxy }
                    .status()
                    .await
                    .with_context(|| format!("the source proxy ({})", d.name))?;
                if matches!(disk.phase, Phase::Failed | Phase::Cancelled | Phase::Idle) {
                    bail!(
                        "the {} migration ended during the memory copy ({}): {}",
                        d.name,
                        disk.phase,
                        disk.error.as_deref().unwrap_or("no reason given")
                    );
                }
            }
        }
    }
}

/// Turns `postcopy-ram` on, destination first (it checks there that the host can fault pages
/// in, `userfaultfd`); with `auto`, a QEMU that refuses leaves memory to pre-copy, with a warning.
async fn enable_ram_postcopy(ctx: &mut Ctx) -> Result<()> {
    if ctx.ram_postcopy == PostcopyArg::Never {
        return Ok(());
    }
    let on = [("postcopy-ram", true)];
    let refused = match ctx.dst.migrate_set_capabilities(&on).await {
        Err(e) => Some(anyhow!(e).context("postcopy-ram on the destination QEMU")),
        Ok(()) => match ctx.src.migrate_set_capabilities(&on).await {
            Err(e) => {
                let _ = ctx.dst.migrate_set_capabilities(&[("postcopy-ram", false)]).await;
                Some(anyhow!(e).context("postcopy-ram on the source QEMU"))
            }
            Ok(()) => None,
        },
    };
    match refused {
        None => Ok(()),
        Some(e) if ctx.ram_postcopy == PostcopyArg::Always => Err(e),
        Some(e) => {
            tracing::warn!("memory will not switch to post-copy: {e:#}");
            ctx.ram_postcopy = PostcopyArg::Never;
            Ok(())
        }
    }
}

/// After a RAM post-copy's switchover (the guest runs on the destination): waits until QEMU
/// has moved the rest of memory, with progress, failing only if it stops moving for
/// `--stall-timeout` or fails. Returns the source's last `query-migrate`.
async fn wait_ram_postcopy(ctx: &mut Ctx) -> Result<qmp_driver::MigrationInfo> {
    let mut moved = (None, Instant::now());
    loop {
        let info = ctx.src.query_migrate().await.context("query-migrate during the RAM post-copy")?;
        match info.status.as_str() {
            "completed" => {
                progress_done();
                return Ok(info);
            }
            "failed" | "cancelled" | "postcopy-paused" => bail!(
                "QEMU's RAM post-copy {}: {} (the guest runs on the destination and misses pages only the \
                 source holds; recover with QEMU's migrate-recover, or the guest is lost)",
                info.status,
                info.error_desc().unwrap_or("no reason given")
            ),
            _ => {}
        }
        if let (Some(done), Some(left)) = (info.ram_transferred(), info.ram_remaining()) {
            progress_line("memory post-copy", &format!("{} MiB left", left >> 20));
            if moved.0 != Some(done) {
                moved = (Some(done), Instant::now());
            } else if moved.1.elapsed() >= ctx.args.stall_timeout {
                bail!("QEMU's RAM post-copy moved no byte for {}", humantime::format_duration(ctx.args.stall_timeout));
            }
        }
        let _ = ctx.src.next_event(MEMORY_WATCH_EVERY).await?;
    }
}

/// Waits for the source QEMU's MIGRATION event with `status`; returns the STOP event's time
/// when waiting for `pre-switchover`, otherwise the event's own time.
async fn wait_migration(qemu: &mut Qmp, status: &str) -> Result<qmp_proto::Timestamp> {
    let mut stop = None;
    loop {
        let e = qemu.wait_event(MIGRATION_EVENT_TIMEOUT, |e| e.name == "MIGRATION" || e.name == "STOP").await?;
        if e.name == "STOP" {
            stop = Some(e.timestamp);
            continue;
        }
        let s = e.data["status"].as_str().unwrap_or_default();
        if s == status {
            return Ok(stop.unwrap_or(e.timestamp));
        }
        if matches!(s, "failed" | "cancelled" | "cancelling") {
            let info = qemu.query_migrate().await?;
            bail!("QEMU's memory migration {s}: {}", info.error_desc().unwrap_or("no reason given"));
        }
    }
}

/// Waits at a named point when the `NBD_ROW_PAUSE` test hook asks for it.
async fn pause(point: &str) {
    if let Some(d) = control_api::pause_at(point) {
        eprintln!("row-migrate: pausing {d:?} at {point} ({})", control_api::PAUSE_VAR);
        tokio::time::sleep(d).await;
    }
}

fn secs(t: &qmp_proto::Timestamp) -> f64 {
    t.seconds as f64 + t.microseconds as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_uris_are_checked() {
        assert_eq!(parse_tcp_uri("tcp:host-b:4444").unwrap(), ("host-b".to_string(), 4444));
        assert_eq!(parse_tcp_uri("tcp:[::1]:4444").unwrap(), ("::1".to_string(), 4444));
        assert_eq!(parse_tcp_uri("tcp:10.0.0.2:4444,ipv4=on").unwrap(), ("10.0.0.2".to_string(), 4444));
        for bad in ["host-b:4444", "unix:/run/x", "tcp:host-b", "tcp::4444", "tcp:h:0", "tcp:h:99999", "tcp:::1:4444"] {
            assert!(parse_tcp_uri(bad).is_err(), "{bad}");
        }
    }
}
