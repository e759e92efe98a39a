//! `row-migrate`: live-migrates a running QEMU guest together with its local disk.
//!
//! It drives the two QEMU processes over QMP and the two nbd-row-proxy processes over their
//! control sockets. For `row` and `bitmap` the proxies move the disk (pre-copy rounds while the
//! guest runs, the final round while QEMU holds the guest paused at `pre-switchover`); for
//! `qemu-mirror` the source QEMU mirrors its drive onto the destination proxy's NBD export, as
//! libvirt's `--copy-storage-all` does. Any failure before `migrate-continue` rolls back: the
//! guest keeps running on the source with no write lost.

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use qmp_driver::Qmp;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Strategy {
    /// Redirect-on-write: base, cold updates, then hot and rewritten blocks while paused.
    Row,
    /// Dirty bitmap: the whole disk, then what was dirtied, round after round.
    Bitmap,
    /// QEMU's own drive mirror onto the destination proxy's NBD export (libvirt's way).
    QemuMirror,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MirrorMode {
    /// Copy dirty data in the background (QEMU's default).
    Background,
    /// Guest writes wait until they are mirrored (converges, slows the guest).
    WriteBlocking,
}

#[derive(Debug, Parser)]
#[command(name = "row-migrate", version, about = "Live-migrate a QEMU guest with its local disk")]
struct Args {
    /// Source QEMU's QMP socket.
    #[arg(long)]
    src_qmp: PathBuf,
    /// Destination QEMU's QMP socket (QEMU started with `-incoming defer`).
    #[arg(long)]
    dst_qmp: PathBuf,
    /// Source nbd-row-proxy control socket.
    #[arg(long)]
    src_proxy: PathBuf,
    /// Destination nbd-row-proxy control socket.
    #[arg(long)]
    dst_proxy: PathBuf,
    /// Where the disk goes: `tcp:HOST:PORT` of `receive --listen` (row, bitmap), or
    /// `nbd://HOST:PORT/EXPORT` of the destination proxy (qemu-mirror).
    #[arg(long)]
    disk_uri: String,
    /// Where QEMU's memory migration goes, e.g. `tcp:HOST:4444`.
    #[arg(long)]
    mem_uri: String,
    /// Migration method.
    #[arg(long, value_enum, default_value_t = Strategy::Row)]
    strategy: Strategy,
    /// Bandwidth cap for disk and memory, bytes/s with an optional K/M/G suffix (e.g. 100M);
    /// unlimited by default.
    #[arg(long, value_parser = parse_size)]
    max_bandwidth: Option<u64>,
    /// QEMU's downtime limit for the memory stop-and-copy, e.g. 300ms or 1s.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime_limit: Duration,
    /// Disk pre-copy rounds before the final one (row: 2, bitmap: 3).
    #[arg(long)]
    rounds: Option<u32>,
    /// Writes that make a block hot (row).
    #[arg(long)]
    hot_threshold: Option<u32>,
    /// qemu-mirror's copy mode.
    #[arg(long, value_enum, default_value_t = MirrorMode::Background)]
    mirror_copy_mode: MirrorMode,
    /// Give up (and roll back) after this long, e.g. 10m.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    timeout: Duration,
    /// Before switchover, check that both proxies hold the same disk (SHA-256 of every byte);
    /// a mismatch rolls back. Costs downtime in proportion to the disk size.
    #[arg(long)]
    verify_disk: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<f64>().map(|n| (n * mult as f64) as u64).map_err(|_| format!("bad size {s:?} (e.g. 100M)"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?} (e.g. 300ms, 2s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Short command timeout; long ones get their own.
const CMD: Duration = Duration::from_secs(30);

struct Ctx {
    args: Args,
    src: Qmp,
    dst: Qmp,
    src_proxy: Qmp,
    dst_proxy: Qmp,
    started: Instant,
    /// What has been changed, so a rollback undoes exactly that.
    disk_started: bool,
    mem_started: bool,
    mirror_started: bool,
    continued: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let json = args.json;
    match run(args).await {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report).expect("report serialises"));
            } else {
                print_report(&report);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("row-migrate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<Value> {
    let connect = |path: &PathBuf, what: &'static str| {
        let path = path.clone();
        async move {
            Qmp::connect(&path, CMD)
                .await
                .with_context(|| format!("cannot reach the {what} at {}", path.display()))
        }
    };
    let src = connect(&args.src_qmp, "source QEMU").await?;
    let dst = connect(&args.dst_qmp, "destination QEMU").await?;
    let src_proxy = connect(&args.src_proxy, "source proxy").await?;
    let dst_proxy = connect(&args.dst_proxy, "destination proxy").await?;
    let timeout = args.timeout;
    let mut ctx = Ctx {
        args,
        src,
        dst,
        src_proxy,
        dst_proxy,
        started: Instant::now(),
        disk_started: false,
        mem_started: false,
        mirror_started: false,
        continued: false,
    };
    preflight(&mut ctx).await?;
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, migrate(&mut ctx)) => match r {
            Ok(r) => r,
            Err(_) => Err(anyhow!("the migration did not finish within {timeout:?}")),
        },
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(report) => Ok(report),
        Err(e) if !ctx.continued => {
            let undone = rollback(&mut ctx).await;
            match undone {
                Ok(()) => Err(e.context("rolled back: the guest keeps running on the source")),
                Err(r) => Err(e.context(format!("and the rollback failed too: {r:#}"))),
            }
        }
        Err(e) => Err(e.context("after switchover")),
    }
}

/// Checks both sides before anything changes.
async fn preflight(ctx: &mut Ctx) -> Result<()> {
    let src_status = ctx.src.query_status().await.context("query-status on the source QEMU")?;
    if src_status.status != "running" {
        bail!("the source guest is not running (status {})", src_status.status);
    }
    let dst_status = ctx.dst.query_status().await.context("query-status on the destination QEMU")?;
    if dst_status.status != "inmigrate" {
        bail!("the destination QEMU is not waiting for a migration (status {}; start it with -incoming defer)", dst_status.status);
    }
    let sp = ctx.src_proxy.execute_raw("query-status", json!({})).await.context("query-status on the source proxy")?;
    let dp = ctx.dst_proxy.execute_raw("query-status", json!({})).await.context("query-status on the destination proxy")?;
    if sp["image-size"] != dp["image-size"] {
        bail!("disk sizes differ: source {} bytes, destination {} bytes", sp["image-size"], dp["image-size"]);
    }
    match ctx.args.strategy {
        Strategy::Row | Strategy::Bitmap => {
            if dp["incoming"] != true {
                bail!("the destination proxy is not waiting for a disk (run it as `nbd-row-proxy receive`)");
            }
            let m = ctx.src_proxy.execute_raw("query-migrate", json!({})).await?;
            if matches!(m["phase"].as_str(), Some("setup" | "precopy" | "ready" | "finishing")) {
                bail!("the source proxy is already migrating (phase {})", m["phase"]);
            }
        }
        Strategy::QemuMirror => {
            if dp["incoming"] == true {
                bail!("for qemu-mirror the destination proxy must be a plain `serve` with --tcp, not `receive`");
            }
        }
    }
    Ok(())
}

async fn migrate(ctx: &mut Ctx) -> Result<Value> {
    let disk_done = match ctx.args.strategy {
        Strategy::Row | Strategy::Bitmap => precopy_disk(ctx).await?,
        Strategy::QemuMirror => mirror_until_ready(ctx).await?,
    };
    let precopy_seconds = ctx.started.elapsed().as_secs_f64();
    // Memory: pause before switchover on the source, late block activation on the destination.
    ctx.src.migrate_set_capabilities(&[("events", true), ("pause-before-switchover", true)]).await?;
    ctx.dst.migrate_set_capabilities(&[("events", true), ("late-block-activate", true)]).await?;
    let mut params = json!({ "downtime-limit": ctx.args.downtime_limit.as_millis() as u64 });
    // Unlimited unless asked (QEMU's default is 128 MiB/s; libvirt sets it unlimited too).
    params["max-bandwidth"] = json!(ctx.args.max_bandwidth.unwrap_or(u64::MAX >> 20));
    ctx.src.migrate_set_parameters(params).await.context("migrate-set-parameters")?;
    ctx.dst.migrate_incoming(&ctx.args.mem_uri).await.context("migrate-incoming on the destination")?;
    ctx.src.migrate(&ctx.args.mem_uri).await.context("migrate on the source")?;
    ctx.mem_started = true;
    progress_line("memory", "copying RAM");
    let stop = wait_migration(&mut ctx.src, "pre-switchover").await?;
    let paused_at = Instant::now();
    // The guest is paused and its block layer flushed: everything from here is downtime.
    let final_disk = match ctx.args.strategy {
        Strategy::Row | Strategy::Bitmap => {
            let r = ctx
                .src_proxy
                .execute_raw_with_timeout("migrate-finish", json!({}), Duration::from_secs(600))
                .await
                .context("the final disk round failed")?;
            ctx.dst_proxy.execute_raw("query-status", json!({})).await.context("the destination proxy after the commit")?;
            r
        }
        Strategy::QemuMirror => mirror_complete(ctx).await?,
    };
    let final_disk_seconds = paused_at.elapsed().as_secs_f64();
    let verify_started = Instant::now();
    let verified = if ctx.args.verify_disk { Some(verify_disk(ctx).await?) } else { None };
    let verify_seconds = if verified.is_some() { verify_started.elapsed().as_secs_f64() } else { 0.0 };
    ctx.src.migrate_continue("pre-switchover").await.context("migrate-continue")?;
    ctx.continued = true;
    wait_migration(&mut ctx.src, "completed").await?;
    let resume = ctx
        .dst
        .wait_event(Duration::from_secs(120), |e| e.name == "RESUME")
        .await
        .context("the destination guest did not resume")?;
    if matches!(ctx.args.strategy, Strategy::Row | Strategy::Bitmap) {
        ctx.src_proxy.execute_raw("migrate-complete", json!({})).await.context("migrate-complete")?;
    }
    let mem = ctx.src.query_migrate().await.context("query-migrate on the source")?;
    let downtime = secs(&resume.timestamp) - secs(&stop);
    let disk = match ctx.args.strategy {
        Strategy::QemuMirror => disk_done,
        _ => final_disk.clone(),
    };
    let total = ctx.started.elapsed().as_secs_f64();
    Ok(json!({
        "strategy": strategy_name(ctx.args.strategy),
        "total-seconds": total,
        "disk-precopy-seconds": precopy_seconds,
        "downtime-ms": downtime * 1000.0,
        "final-disk-round-ms": final_disk_seconds * 1000.0,
        "memory-stop-and-copy-ms": ((downtime - final_disk_seconds - verify_seconds) * 1000.0).max(0.0),
        "verify-disk-ms": verify_seconds * 1000.0,
        "qemu-reported-downtime-ms": mem.downtime_ms(),
        "memory-bytes": mem.ram_transferred(),
        "memory-total-time-ms": mem.total_time_ms(),
        "disk": disk,
        "disk-verified": verified,
    }))
}

/// Compares the disk digests of both proxies while the guest is paused.
async fn verify_disk(ctx: &mut Ctx) -> Result<Value> {
    let long = Duration::from_secs(600);
    let (a, b) = tokio::join!(
        ctx.src_proxy.execute_raw_with_timeout("query-digest", json!({}), long),
        ctx.dst_proxy.execute_raw_with_timeout("query-digest", json!({}), long)
    );
    let a = a.context("digest of the source disk")?;
    let b = b.context("digest of the destination disk")?;
    if a["sha256"] != b["sha256"] {
        bail!("the destination disk differs from the source (sha256 {} vs {})", b["sha256"], a["sha256"]);
    }
    Ok(json!({ "sha256": a["sha256"], "seconds": a["seconds"].as_f64().unwrap_or(0.0) + b["seconds"].as_f64().unwrap_or(0.0) }))
}

/// Starts the proxies' pre-copy rounds and follows them until `ready`.
async fn precopy_disk(ctx: &mut Ctx) -> Result<Value> {
    let mut args = json!({
        "uri": ctx.args.disk_uri,
        "strategy": strategy_name(ctx.args.strategy),
    });
    if let Some(r) = ctx.args.rounds {
        args["rounds"] = json!(r);
    }
    if let Some(t) = ctx.args.hot_threshold {
        args["hot-threshold"] = json!(t);
    }
    if let Some(b) = ctx.args.max_bandwidth {
        args["max-bandwidth"] = json!(b);
    }
    ctx.src_proxy.execute_raw("migrate-start", args).await.context("migrate-start on the source proxy")?;
    ctx.disk_started = true;
    let mut last_round = 0;
    loop {
        let m = ctx.src_proxy.execute_raw("query-migrate", json!({})).await?;
        match m["phase"].as_str() {
            Some("ready") => {
                progress_done();
                return Ok(m);
            }
            Some("failed") => bail!("the disk migration failed: {}", m["error"].as_str().unwrap_or("unknown error")),
            Some("cancelled") => bail!("the disk migration was cancelled"),
            _ => {}
        }
        let round = m["round"].as_u64().unwrap_or(0);
        let kind = m["rounds"].as_array().and_then(|r| r.last()).map_or("base", |_| "update");
        let remaining = m["round-remaining-blocks"].as_u64().unwrap_or(0);
        let rate = m["rate"].as_f64().unwrap_or(0.0) / 1e6;
        if round != last_round || std::io::stderr().is_terminal() {
            progress_line(
                &format!("disk round {round}"),
                &format!("{kind}: {} MiB left, {rate:.0} MB/s", remaining * 4096 >> 20),
            );
            last_round = round;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for the source QEMU's MIGRATION event with `status`; returns the STOP event's time
/// when waiting for `pre-switchover`, otherwise the event's own time.
async fn wait_migration(qemu: &mut Qmp, status: &str) -> Result<qmp_proto::Timestamp> {
    let mut stop = None;
    loop {
        let e = qemu.wait_event(Duration::from_secs(600), |e| e.name == "MIGRATION" || e.name == "STOP").await?;
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

/// qemu-mirror: `blockdev-mirror` onto the destination proxy until the job is READY.
async fn mirror_until_ready(ctx: &mut Ctx) -> Result<Value> {
    let (host, port, export) = parse_nbd_uri(&ctx.args.disk_uri)?;
    let blocks = ctx.src.execute_raw("query-block", json!({})).await?;
    let node = blocks
        .as_array()
        .and_then(|b| b.iter().find_map(|d| d["inserted"]["node-name"].as_str().map(str::to_string)))
        .ok_or_else(|| anyhow!("the source QEMU has no drive to mirror"))?;
    ctx.src
        .execute_raw(
            "blockdev-add",
            json!({ "driver": "nbd", "node-name": "rowmig-target",
                    "server": { "type": "inet", "host": host, "port": port }, "export": export }),
        )
        .await
        .context("connecting the source QEMU to the destination proxy")?;
    ctx.mirror_started = true;
    let mode = match ctx.args.mirror_copy_mode {
        MirrorMode::Background => "background",
        MirrorMode::WriteBlocking => "write-blocking",
    };
    let mut job = json!({ "job-id": "rowmig-mirror", "device": node, "target": "rowmig-target",
                          "sync": "full", "copy-mode": mode });
    if let Some(b) = ctx.args.max_bandwidth {
        job["speed"] = json!(b);
    }
    ctx.src.execute_raw("blockdev-mirror", job).await.context("blockdev-mirror")?;
    loop {
        if let Some(e) = ctx.src.next_event(Duration::from_millis(250)).await? {
            match e.name.as_str() {
                "BLOCK_JOB_READY" => break,
                "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_ERROR" => bail!("the mirror job ended early: {}", e.data),
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
    mirror_stats(ctx).await
}

async fn mirror_stats(ctx: &mut Ctx) -> Result<Value> {
    let jobs = ctx.src.execute_raw("query-block-jobs", json!({})).await?;
    let job = jobs.as_array().and_then(|j| j.first()).cloned().unwrap_or_default();
    Ok(json!({ "strategy": "qemu-mirror", "total-wire-bytes": job["offset"], "len": job["len"] }))
}

/// At `pre-switchover`: cancel the READY mirror, which leaves the target consistent.
async fn mirror_complete(ctx: &mut Ctx) -> Result<Value> {
    let stats = mirror_stats(ctx).await?;
    ctx.src.execute_raw("block-job-cancel", json!({ "device": "rowmig-mirror" })).await.context("block-job-cancel")?;
    ctx.src
        .wait_event(Duration::from_secs(300), |e| e.name == "BLOCK_JOB_COMPLETED" || e.name == "BLOCK_JOB_CANCELLED")
        .await
        .context("the mirror did not complete")?;
    let _ = ctx.src.execute_raw("blockdev-del", json!({ "node-name": "rowmig-target" })).await;
    ctx.mirror_started = false;
    Ok(stats)
}

/// Undoes whatever was started, leaving the guest running on the source.
async fn rollback(ctx: &mut Ctx) -> Result<()> {
    eprintln!("row-migrate: rolling back");
    let mut errors = Vec::new();
    if ctx.mem_started {
        if let Err(e) = ctx.src.migrate_cancel().await {
            errors.push(format!("migrate_cancel: {e:#}"));
        }
    }
    if ctx.mirror_started {
        let _ = ctx.src.execute_raw("block-job-cancel", json!({ "device": "rowmig-mirror", "force": true })).await;
        let _ = ctx.src.wait_event(Duration::from_secs(30), |e| e.name.starts_with("BLOCK_JOB_")).await;
        let _ = ctx.src.execute_raw("blockdev-del", json!({ "node-name": "rowmig-target" })).await;
    }
    if ctx.disk_started {
        if let Err(e) = ctx.src_proxy.execute_raw_with_timeout("migrate-cancel", json!({}), Duration::from_secs(60)).await {
            errors.push(format!("migrate-cancel on the source proxy: {e:#}"));
        }
    }
    // The guest may be paused at pre-switchover or by a failed migration: run it again.
    for _ in 0..50 {
        match ctx.src.query_status().await {
            Ok(s) if s.running => break,
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

fn secs(t: &qmp_proto::Timestamp) -> f64 {
    t.seconds as f64 + t.microseconds as f64 / 1e6
}

fn parse_nbd_uri(uri: &str) -> Result<(String, String, String)> {
    let rest = uri.strip_prefix("nbd://").ok_or_else(|| anyhow!("--disk-uri for qemu-mirror must be nbd://HOST:PORT/EXPORT"))?;
    let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
    Ok((host.to_string(), port.to_string(), export.to_string()))
}

fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::Row => "row",
        Strategy::Bitmap => "bitmap",
        Strategy::QemuMirror => "qemu-mirror",
    }
}

fn progress_line(what: &str, detail: &str) {
    static LAST: std::sync::Mutex<Option<(String, Instant)>> = std::sync::Mutex::new(None);
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K{what}: {detail}");
    } else {
        // Plain lines for logs: a new stage at once, the same stage at most every 2 s.
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.as_ref().is_none_or(|(w, t)| w != what || t.elapsed() >= Duration::from_secs(2));
        if !due {
            return;
        }
        *last = Some((what.to_string(), Instant::now()));
        let _ = writeln!(err, "{what}: {detail}");
    }
    let _ = err.flush();
}

fn progress_done() {
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = writeln!(err);
    }
}

fn mb(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |b| format!("{:.1}", b / 1e6))
}

fn print_report(r: &Value) {
    println!("strategy              {}", r["strategy"].as_str().unwrap_or("?"));
    println!("total time            {:.1} s", r["total-seconds"].as_f64().unwrap_or(0.0));
    println!(
        "downtime              {:.0} ms  (final disk round {:.0} ms + memory stop-and-copy {:.0} ms)",
        r["downtime-ms"].as_f64().unwrap_or(0.0),
        r["final-disk-round-ms"].as_f64().unwrap_or(0.0),
        r["memory-stop-and-copy-ms"].as_f64().unwrap_or(0.0)
    );
    if let Some(ms) = r["verify-disk-ms"].as_f64().filter(|ms| *ms > 0.0) {
        println!("disk check            {ms:.0} ms of the downtime (--verify-disk: both digests equal)");
    }
    println!("memory                {} MB", mb(&r["memory-bytes"]));
    let disk = &r["disk"];
    if let Some(rounds) = disk["rounds"].as_array() {
        println!("disk round  kind     blocks   logical MB   wire MB   seconds");
        for round in rounds {
            println!(
                "{:>10}  {:<7} {:>7}   {:>10}   {:>7}   {:>7.2}",
                round["round"].as_u64().unwrap_or(0),
                round["kind"].as_str().unwrap_or("?"),
                round["blocks"].as_u64().unwrap_or(0),
                mb(&round["logical-bytes"]),
                mb(&round["wire-bytes"]),
                round["seconds"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "disk update data      {} MB logical, {} MB on the wire (after round 1)",
            mb(&disk["update-logical-bytes"]),
            mb(&disk["update-wire-bytes"])
        );
    }
    println!("disk on the wire      {} MB", mb(&disk["total-wire-bytes"]));
}
