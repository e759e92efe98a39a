//! `nbd-row-proxy-libvirt-hook`: libvirt's QEMU hook for the disks nbd-row-proxy serves
//! (installed as `/etc/libvirt/hooks/qemu.d/nbd-row-proxy`).
//!
//! libvirt runs it on the destination host at the start of an incoming migration
//! (`DOMAIN migrate begin -`, the domain's XML on stdin), before the destination QEMU starts.
//! For each writable disk of the domain on nbd-row-proxy it makes sure the receiving proxy runs
//! (starting the instance `/etc/nbd-row-proxy/NAME.conf` describes, with systemd or by itself)
//! and that a source proxy has armed it (pre-copying the disk to it). Otherwise it fails, and
//! libvirt fails the migration with its message before anything moves: a guest started here on a
//! proxy that nobody armed would run on a stale copy of its disk. Every other hook call is
//! accepted at once. It never calls back into libvirt and prints nothing on stdout (libvirt
//! keeps the domain's XML as it is).

mod conf;
mod needs;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use control_api::{NoArgs, QueryStatus, StatusReply};
use qmp_driver::{Peer, Qmp};

use crate::conf::Instance;
use crate::needs::Need;

/// How a configured instance is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Start {
    /// systemd's `nbd-row-proxy@NAME.service` when systemd runs the host, else `spawn`.
    Auto,
    /// `systemctl start nbd-row-proxy@NAME.service`.
    Systemd,
    /// The hook starts `nbd-row-proxy` itself, detached, as the unit would run it (hosts and
    /// containers without systemd); its output goes to `--log-dir/NAME.log`, its pid to the
    /// control socket's path with `.pid`.
    Spawn,
}

/// libvirt's QEMU hook for disks on nbd-row-proxy: before an incoming migration, starts the
/// receiving proxies the domain needs and refuses the migration unless each one is armed.
#[derive(Debug, Parser)]
#[command(name = "nbd-row-proxy-libvirt-hook", version)]
#[command(after_help = "libvirt calls it as HOOK DOMAIN OPERATION SUB-OPERATION EXTRA with the domain's XML on \
                        stdin; only `migrate begin` is acted on. Exit 0 lets libvirt go on; exit 1 fails the \
                        migration with the message on stderr.")]
struct Cli {
    /// The domain's name.
    #[arg(allow_hyphen_values = true)]
    domain: String,
    /// libvirt's operation (`migrate`, `prepare`, `start`, ...).
    operation: String,
    /// libvirt's sub-operation (`begin`, `end`, ...).
    sub_operation: String,
    /// libvirt's extra argument (`-`), and any a later libvirt may add.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
    extra: Vec<String>,
    /// Where the instances are configured (one `NAME.conf` per served disk).
    #[arg(long, value_name = "DIR", default_value = "/etc/nbd-row-proxy")]
    conf_dir: PathBuf,
    /// How to start a configured instance that is not running.
    #[arg(long, value_enum, default_value_t = Start::Auto)]
    start: Start,
    /// The proxy `--start spawn` runs.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/nbd-row-proxy")]
    proxy: PathBuf,
    /// Where `--start spawn` writes each instance's log.
    #[arg(long, value_name = "DIR", default_value = "/var/log/nbd-row-proxy")]
    log_dir: PathBuf,
    /// How long a started instance may take to answer on its control socket.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    start_timeout: Duration,
}

/// The largest domain XML read from stdin.
const XML_MAX: u64 = 16 << 20;

/// How long a running proxy may take to answer `query-status`.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The proxy's state, or why it cannot be reached.
async fn query(control: &Path) -> Result<StatusReply, String> {
    let mut q = Qmp::connect_to(control, QUERY_TIMEOUT, Peer::Proxy).await.map_err(|e| e.to_string())?;
    q.set_timeout(QUERY_TIMEOUT);
    q.call::<QueryStatus>(NoArgs {}).await.map_err(|e| e.to_string())
}

/// Runs `systemctl start nbd-row-proxy@NAME.service` (it returns once the proxy is ready), for
/// at most `limit`: libvirt waits for the hook.
async fn start_systemd(i: &Instance, limit: Duration) -> Result<(), String> {
    let unit = format!("nbd-row-proxy@{}.service", i.name);
    let mut child = Command::new("systemctl")
        .args(["start", &unit])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("systemctl start {unit} did not return within {limit:?} (journalctl -u {unit})"));
            }
            Err(e) => return Err(format!("systemctl start {unit}: {e}")),
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("systemctl start {unit}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("systemctl start {unit} failed ({}): {} (journalctl -u {unit})", out.status, err.trim()));
    }
    Ok(())
}

/// Starts the proxy as `nbd-row-proxy@NAME.service` would run it, detached from libvirt.
fn spawn(cli: &Cli, i: &Instance) -> Result<(u32, PathBuf), String> {
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::process::CommandExt;
    let image = i.image.as_deref().unwrap_or_default();
    for dir in [i.socket.parent(), i.control.parent(), Some(cli.log_dir.as_path())].into_iter().flatten() {
        if dir.exists() {
            continue;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // As the unit's RuntimeDirectory: group kvm, so QEMU run by libvirt reaches the socket.
        if let Some(gid) = group_id("kvm") {
            let _ = std::os::unix::fs::chown(dir, None, Some(gid));
        }
    }
    let log_path = cli.log_dir.join(format!("{}.log", i.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let err = log.try_clone().map_err(|e| format!("{}: {e}", log_path.display()))?;
    let child = Command::new(&cli.proxy)
        .arg(&i.mode)
        .arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(&i.socket)
        .arg("--control")
        .arg(&i.control)
        .args(&i.args)
        .env("RUST_LOG", &i.rust_log)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own process group: libvirt's signals to the hook are not the proxy's.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", cli.proxy.display()))?;
    let pid = child.id();
    let pid_file = i.control.with_extension("pid");
    if let Err(e) = std::fs::write(&pid_file, format!("{pid}\n")) {
        tracing::warn!("cannot write {}: {e}", pid_file.display());
    }
    Ok((pid, log_path))
}

/// A group's id from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok()).flatten()
    })
}

/// Whether a spawned proxy has already exited.
fn exited(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
}

/// The last lines of a log (from its last 16 KiB), for a message.
fn tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.len() {
        0 => "it wrote nothing".into(),
        n => lines[n.saturating_sub(3)..].join(" | "),
    }
}

/// Starts the instance behind `need` and waits until its control socket answers.
async fn start(cli: &Cli, need: &Need<'_>, i: &Instance) -> Result<StatusReply, String> {
    needs::startable(i)?;
    let systemd = match cli.start {
        Start::Systemd => true,
        Start::Spawn => false,
        Start::Auto => Path::new("/run/systemd/system").exists(),
    };
    let spawned =
        if systemd { start_systemd(i, cli.start_timeout).await.map(|()| None)? } else { Some(spawn(cli, i)?) };
    eprintln!(
        "nbd-row-proxy: domain {}: disk {}: started instance {} ({})",
        cli.domain,
        need.target,
        i.name,
        i.file.display()
    );
    let deadline = Instant::now() + cli.start_timeout;
    loop {
        let last = match query(&need.control).await {
            Ok(status) => return Ok(status),
            Err(e) => e,
        };
        if let Some((pid, log)) = &spawned {
            if exited(*pid) {
                return Err(format!("the started proxy exited: {} ({})", tail(log), log.display()));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "instance {} started but {} does not answer after {:?}: {last}",
                i.name,
                need.control.display(),
                cli.start_timeout
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One disk: its proxy running (started if need be) and armed.
async fn check(cli: &Cli, need: &Need<'_>) -> Result<(), String> {
    let status = match (query(&need.control).await, need.instance) {
        (Ok(status), _) => status,
        (Err(_), Some(i)) => start(cli, need, i).await?,
        (Err(e), None) => {
            return Err(format!(
                "no proxy answers on {} ({e}), and no instance in {} serves {}",
                need.control.display(),
                cli.conf_dir.display(),
                need.socket.display()
            ))
        }
    };
    needs::ready(&cli.domain, &status)
}

/// `migrate begin`: every disk of ours ready, or the reasons it is not.
async fn incoming(cli: &Cli, xml: &str) -> Result<Vec<String>, Vec<String>> {
    let disks = qmp_driver::domain_xml::parse_disks(xml).map_err(|e| vec![e])?;
    let sockets = needs::unix_sockets(&disks);
    if sockets.is_empty() {
        return Ok(Vec::new());
    }
    let (instances, unreadable) = conf::read_dir(&cli.conf_dir);
    let needs = needs::needs(&disks, &instances, same_socket, our_control);
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    // A disk none of ours serves is left to libvirt, unless a conf that could not be read may
    // be the one that serves it.
    if !unreadable.is_empty() {
        for (target, socket) in &sockets {
            if !needs.iter().any(|n| n.socket == same_socket(socket)) {
                errors.push(format!(
                    "disk {target} ({}): no readable instance serves it, and these could not be read: {}",
                    socket.display(),
                    unreadable.join("; ")
                ));
            }
        }
    }
    for need in &needs {
        match check(cli, need).await {
            Ok(()) => ok.push(format!("disk {} ({}) is armed", need.target, need.socket.display())),
            Err(e) => errors.push(format!("disk {} ({}): {e}", need.target, need.socket.display())),
        }
    }
    if errors.is_empty() {
        Ok(ok)
    } else {
        Err(errors)
    }
}

/// A socket path as the host resolves it (its directory's symbolic links and `.`/`..`), so
/// `/var/run/nbd-row-proxy/x.sock` is `/run/nbd-row-proxy/x.sock`; as given if the directory
/// does not exist.
fn same_socket(path: &Path) -> PathBuf {
    match (path.parent().map(std::fs::canonicalize), path.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// Whether `path` is a control socket a proxy of ours made for a disk started by hand: a
/// socket owned by this user (root) that no one else may open (the proxy makes it 0600), not
/// any socket the source's XML may point at.
fn our_control(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket() && m.uid() == me && m.mode() & 0o077 == 0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if let Some(code) = cli_docs::hook(<Cli as clap::CommandFactory>::command, &["nbd-row-proxy", "row-migrate"]) {
        return code;
    }
    let cli = Cli::parse();
    let _ = logging::init(logging::LogFormat::Text, "warn");
    // libvirt writes the XML to stdin for every call: every other call is drained and accepted.
    if (cli.operation.as_str(), cli.sub_operation.as_str()) != ("migrate", "begin") {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        return ExitCode::SUCCESS;
    }
    // It comes from the migration's source host: bounded (libvirt's own messages are smaller).
    let mut xml = String::new();
    if let Err(e) = std::io::stdin().take(XML_MAX + 1).read_to_string(&mut xml) {
        eprintln!("nbd-row-proxy: domain {}: cannot read the domain's XML on stdin: {e}", cli.domain);
        return ExitCode::FAILURE;
    }
    if xml.len() as u64 > XML_MAX {
        eprintln!("nbd-row-proxy: domain {}: the domain's XML is over {} MiB: refused", cli.domain, XML_MAX >> 20);
        return ExitCode::FAILURE;
    }
    match incoming(&cli, &xml).await {
        Ok(lines) => {
            for l in lines {
                eprintln!("nbd-row-proxy: domain {}: {l}", cli.domain);
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("nbd-row-proxy: domain {}: {e}", cli.domain);
            }
            ExitCode::FAILURE
        }
    }
}
