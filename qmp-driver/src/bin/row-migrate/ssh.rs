//! `--dst-ssh` and `--src-ssh`: one host's Unix sockets reached through the system's OpenSSH
//! client, so that row-migrate can run on one host (or a third one) instead of where both
//! hosts' sockets are visible.
//!
//! With `--dst-ssh [USER@]HOST`, every destination socket on the command line (`--dst-qmp`,
//! each disk's destination control socket) is a path on HOST. row-migrate starts one
//! `ssh -N -L LOCAL:REMOTE ...` with a `-L` per socket, its local ends in a private temporary
//! directory (mode 0700), waits until ssh listens on all of them, and from then on talks to the
//! local ends as it talks to local sockets. The ssh process and the directory go when
//! row-migrate ends: on success, on any failure, after the rollback of a Ctrl-C, and on
//! SIGTERM, SIGHUP or a SIGINT that nothing else handles (those end row-migrate at once, as they
//! did before, once the tunnel is closed). ssh runs in its own process group, so a Ctrl-C typed
//! at the terminal reaches row-migrate only (which still needs the tunnel to roll back), and
//! with `PR_SET_PDEATHSIG`, so it goes even when row-migrate is killed with SIGKILL.
//!
//! sshd must allow Unix-socket forwarding (`AllowStreamLocalForwarding`, yes by default) and
//! the user must be able to open the sockets there (root, like row-migrate itself).

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::BufRead as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

use crate::ctx::Failure;
use crate::disks::disk_specs;
use crate::disks::proxy_flags;
use crate::{exit, Args};

/// The OpenSSH client, found on PATH.
const SSH: &str = "ssh";
/// ssh's `ConnectTimeout` unless an option sets it (seconds).
const CONNECT_TIMEOUT: u64 = 10;
/// How long the forwards may take to come up beyond the connect timeout: key exchange,
/// authentication, the listeners.
const LOGIN_TIME: Duration = Duration::from_secs(20);
/// How often the wait for the forwards looks.
const POLL: Duration = Duration::from_millis(25);
/// How long ssh may take to go after SIGTERM before it gets SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// ssh's stderr lines kept for messages.
const STDERR_LINES: usize = 20;
/// How long a failed run waits for ssh's last lines before its message is put together.
const STDERR_SETTLE: Duration = Duration::from_millis(200);
/// The longest path a Unix socket may have (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;

/// Which host's sockets go through ssh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `--src-ssh`: `--src-qmp` and each disk's source control socket.
    Source,
    /// `--dst-ssh`: `--dst-qmp` and each disk's destination control socket.
    Destination,
}

impl Side {
    /// The flag that names the host.
    pub fn flag(self) -> &'static str {
        match self {
            Side::Source => "--src-ssh",
            Side::Destination => "--dst-ssh",
        }
    }

    /// Its key in the report.
    fn key(self) -> &'static str {
        &self.flag()[2..]
    }

    /// The local sockets' name prefix.
    fn prefix(self) -> &'static str {
        match self {
            Side::Source => "src",
            Side::Destination => "dst",
        }
    }

    /// The host's name in messages.
    fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The command line: [USER@]HOST and -o options

/// `--dst-ssh [USER@]HOST`: where ssh logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The user, if given (ssh's default otherwise: the local user, or the config's `User`).
    pub user: Option<String>,
    /// A host name, an address, or a `Host` alias of ssh_config.
    pub host: String,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.user {
            Some(user) => write!(f, "{user}@{}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// Parses `[USER@]HOST` for `--dst-ssh`/`--src-ssh`: no ssh:// URI, no `HOST:PORT` (the port
/// goes in `--dst-ssh-option Port=P`), nothing ssh would take for an option.
pub fn parse_destination(s: &str) -> Result<Destination, String> {
    let expected = "expected [USER@]HOST, e.g. root@host-b (a port goes in the ssh options: Port=PORT)";
    if s.contains("://") {
        return Err(format!("{s:?}: no URI; {expected}"));
    }
    let (user, host) = match s.split_once('@') {
        Some((user, host)) => (Some(user), host),
        None => (None, s),
    };
    if let Some(user) = user {
        let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '@' | ':' | '/' | '\\');
        if user.is_empty() || user.starts_with('-') || user.chars().any(bad) {
            return Err(format!("{s:?}: {user:?} is no user name; {expected}"));
        }
    }
    if host.contains('@') {
        return Err(format!("{s:?}: more than one @; {expected}"));
    }
    if host.starts_with('[') {
        return Err(format!("{s:?}: ssh takes an IPv6 address without brackets, e.g. root@fd00::2"));
    }
    let good = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%');
    if host.is_empty() || host.starts_with('-') || !host.chars().all(good) {
        return Err(format!("{s:?}: {host:?} is no host name or address; {expected}"));
    }
    if host.matches(':').count() == 1 {
        return Err(format!("{s:?}: HOST:PORT is not taken; give the port as an ssh option: --dst-ssh-option (or --src-ssh-option) Port=PORT"));
    }
    Ok(Destination { user: user.map(str::to_string), host: host.to_string() })
}

/// `--dst-ssh-option OPT`: one ssh_config option, passed as `-o KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshOption {
    /// The keyword, as given (ssh compares keywords without case).
    pub key: String,
    /// Its value.
    pub value: String,
}

impl fmt::Display for SshOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Options row-migrate sets itself, or that would take the forwards out of the one ssh process
/// it watches and ends: refused rather than silently overridden.
const RESERVED: [&str; 14] = [
    "ExitOnForwardFailure",
    "StreamLocalBindUnlink",
    "ControlMaster",
    "ControlPath",
    "ControlPersist",
    "ClearAllForwardings",
    "LocalForward",
    "RemoteForward",
    "DynamicForward",
    "ForkAfterAuthentication",
    "SessionType",
    "RemoteCommand",
    "RequestTTY",
    "StdinNull",
];

/// Parses one ssh option as ssh_config writes it (`Key=Value`, `Key Value` or `Key = Value`),
/// e.g. `IdentityFile=/root/.ssh/id_migrate`, `Port=2222`, `StrictHostKeyChecking=yes`.
pub fn parse_option(s: &str) -> Result<SshOption, String> {
    let expected = "expected an ssh_config option as KEY=VALUE, e.g. Port=2222 or IdentityFile=/root/.ssh/id_ed25519";
    if s.chars().any(|c| c.is_control()) {
        return Err(format!("{s:?}: a control character; {expected}"));
    }
    let s = s.trim();
    let end = s.find(|c: char| c == '=' || c.is_whitespace()).ok_or_else(|| format!("{s:?}: no value; {expected}"))?;
    let (key, rest) = s.split_at(end);
    let value = rest.trim_start();
    let value = value.strip_prefix('=').unwrap_or(value).trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("{s:?}: {key:?} is no ssh_config keyword; {expected}"));
    }
    if value.is_empty() {
        return Err(format!("{s:?}: no value; {expected}"));
    }
    if let Some(reserved) = RESERVED.iter().find(|r| r.eq_ignore_ascii_case(key)) {
        return Err(format!(
            "{s:?}: row-migrate sets {reserved} itself (its one ssh process forwards exactly the sockets given, and \
             exits with it)"
        ));
    }
    Ok(SshOption { key: key.to_string(), value: value.to_string() })
}

/// The connect timeout the options give (seconds), or row-migrate's.
fn connect_timeout(options: &[SshOption]) -> u64 {
    options
        .iter()
        .find(|o| o.key.eq_ignore_ascii_case("ConnectTimeout"))
        .and_then(|o| o.value.parse().ok())
        .unwrap_or(CONNECT_TIMEOUT)
}

// ---------------------------------------------------------------------------------------------
// What to forward

/// One socket to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The flag that named it, for messages.
    pub flag: String,
    /// Its path on the remote host.
    pub remote: PathBuf,
    /// The local end's file name in the tunnel's directory.
    pub name: String,
}

/// The sockets of `side` the command line names, in order, with the flag that named each: the
/// QMP socket, then each disk's control socket (the single-disk flag first, as `disk_specs`
/// orders them).
pub fn sockets(args: &Args, side: Side) -> Vec<(String, PathBuf)> {
    let pick = |(src, dst): (String, String)| if side == Side::Source { src } else { dst };
    let qmp = match side {
        Side::Source => ("--src-qmp".to_string(), args.src_qmp.clone()),
        Side::Destination => ("--dst-qmp".to_string(), args.dst_qmp.clone()),
    };
    // --arm-only names no QMP socket.
    let mut out: Vec<(String, PathBuf)> = qmp.1.map(|path| (qmp.0, path)).into_iter().collect();
    let single = match side {
        Side::Source => args.src_proxy.clone(),
        Side::Destination => args.dst_proxy.clone(),
    };
    let offset = usize::from(args.src_proxy.is_some());
    if let Some(path) = single {
        out.push((pick(proxy_flags(args, 0)), path));
    }
    for (j, disk) in args.disks.iter().enumerate() {
        let path = if side == Side::Source { &disk.src_proxy } else { &disk.dst_proxy };
        out.push((pick(proxy_flags(args, j + offset)), path.clone()));
    }
    out
}

/// Checks the remote paths (absolute, no `:`, which `-L` would split at, none given twice) and
/// names their local ends.
pub fn plan(side: Side, dest: &Destination, sockets: &[(String, PathBuf)]) -> Result<Vec<Forward>, String> {
    let mut seen: Vec<(&str, &Path)> = Vec::new();
    let mut forwards = Vec::new();
    for (i, (flag, remote)) in sockets.iter().enumerate() {
        let shown = remote.display();
        if !remote.is_absolute() {
            return Err(format!(
                "{flag} {shown}: with {} the path is one on {dest}, and must be absolute",
                side.flag()
            ));
        }
        let text = remote.as_os_str().as_encoded_bytes();
        if text.contains(&b':') || text.iter().any(u8::is_ascii_control) {
            return Err(format!("{flag} {shown}: ssh cannot forward a path with a colon or a control character"));
        }
        if let Some((other, _)) = seen.iter().find(|(_, p)| *p == remote.as_path()) {
            return Err(format!(
                "{other} and {flag} are the same socket on {dest} ({shown}): each names a different component"
            ));
        }
        seen.push((flag, remote));
        let name =
            if i == 0 { format!("{}-qmp.sock", side.prefix()) } else { format!("{}-disk{i}.sock", side.prefix()) };
        forwards.push(Forward { flag: flag.clone(), remote: remote.clone(), name });
    }
    Ok(forwards)
}

/// ssh's arguments: no command (`-N`), the options row-migrate needs first (ssh takes the first
/// value it gets for an option), then the user's, then defaults the user may override, one
/// `-L LOCAL:REMOTE` per socket, and the destination after `--`.
pub fn ssh_args(dest: &Destination, options: &[SshOption], dir: &Path, forwards: &[Forward]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-N".into(), "-T".into()];
    let mut opt = |o: String| {
        args.push("-o".into());
        args.push(o.into());
    };
    // A listener ssh cannot set up ends it (instead of a forward silently missing); a stale
    // socket file is replaced; no shared connection holds the forwards beyond this process.
    for o in ["ExitOnForwardFailure=yes", "StreamLocalBindUnlink=yes", "ControlMaster=no", "ControlPath=none"] {
        opt(o.to_string());
    }
    for o in options {
        opt(o.to_string());
    }
    // No prompt nobody sees (a key or an agent logs in), and a dead host noticed.
    for o in [
        "BatchMode=yes".to_string(),
        format!("ConnectTimeout={CONNECT_TIMEOUT}"),
        "ServerAliveInterval=15".to_string(),
        "ServerAliveCountMax=3".to_string(),
    ] {
        opt(o);
    }
    for f in forwards {
        let mut spec = dir.join(&f.name).into_os_string();
        spec.push(":");
        spec.push(&f.remote);
        args.push("-L".into());
        args.push(spec);
    }
    args.push("--".into());
    args.push(dest.to_string().into());
    args
}

/// The listening Unix sockets in the text of `/proc/net/unix` (flag `__SO_ACCEPTCON`).
pub fn listening(proc_net_unix: &str) -> HashSet<PathBuf> {
    const SO_ACCEPTCON: u32 = 0x10000;
    let mut out = HashSet::new();
    for line in proc_net_unix.lines().skip(1) {
        // Num: RefCount Protocol Flags Type St Inode Path
        let Some((_, mut rest)) = line.split_once(": ") else { continue };
        let mut fields = Vec::new();
        for _ in 0..6 {
            rest = rest.trim_start();
            let (field, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            fields.push(field);
            rest = tail;
        }
        let path = rest.trim_start();
        let listens = u32::from_str_radix(fields[2], 16).is_ok_and(|f| f & SO_ACCEPTCON != 0);
        if listens && path.starts_with('/') {
            out.insert(PathBuf::from(path));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The ssh processes

/// An ssh process and its directory, until row-migrate ends them.
struct Running {
    child: Child,
    dir: Option<tempfile::TempDir>,
}

/// Every ssh process row-migrate started, for [`close_all`] (from the end of `main` or from
/// the signal guard).
static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());

/// Set once the migration's own Ctrl-C handling is in place (tokio's handler stays installed
/// from then on): a SIGINT then belongs to the rollback, which still needs the tunnels.
static SIGINT_HANDLED: AtomicBool = AtomicBool::new(false);

/// `tokio::signal::ctrl_c()`, noting that SIGINT is handled from now on (the signal guard then
/// leaves it alone). The migration sequence waits on this instead of tokio's directly.
pub async fn ctrl_c() -> std::io::Result<()> {
    SIGINT_HANDLED.store(true, Ordering::SeqCst);
    tokio::signal::ctrl_c().await
}

fn running() -> std::sync::MutexGuard<'static, Vec<Running>> {
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ends every ssh process (SIGTERM, SIGKILL after [`KILL_GRACE`]) and removes its directory.
fn close_all() {
    let all: Vec<Running> = std::mem::take(&mut *running());
    for mut r in all {
        stop(&mut r.child);
        if let Some(dir) = r.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Ends one ssh process and reaps it.
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on the pid of our own child, not yet reaped (so not reused).
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let until = Instant::now() + KILL_GRACE;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How ssh ended, if it has (`None` while it runs or once it is closed).
fn exit_status(pid: u32) -> Option<ExitStatus> {
    running().iter_mut().find(|r| r.child.id() == pid).and_then(|r| r.child.try_wait().ok().flatten())
}

/// Whether a signal is ignored (as `nohup` leaves SIGHUP): the guard then leaves it ignored.
fn ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction(2) with a null new action only reads the current one into `old`, a
    // zeroed struct of the right type.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// An exit status in messages: `status 255`, `signal 15`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// Closes the tunnels on SIGTERM, SIGHUP, and on a SIGINT the migration does not handle, then
/// dies of the signal as row-migrate did before it had tunnels. A signal row-migrate was
/// started with ignored stays ignored.
fn spawn_signal_guard() -> Result<()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let watch = |kind: SignalKind, sig: libc::c_int| -> Result<Option<Signal>> {
        if ignored(sig) {
            return Ok(None);
        }
        signal(kind).map(Some).with_context(|| format!("a handler for signal {sig}"))
    };
    async fn next(s: &mut Option<Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let mut term = watch(SignalKind::terminate(), libc::SIGTERM)?;
    let mut hup = watch(SignalKind::hangup(), libc::SIGHUP)?;
    let mut int = watch(SignalKind::interrupt(), libc::SIGINT)?;
    tokio::spawn(async move {
        let sig = loop {
            tokio::select! {
                _ = next(&mut term) => break libc::SIGTERM,
                _ = next(&mut hup) => break libc::SIGHUP,
                _ = next(&mut int) => if !SIGINT_HANDLED.load(Ordering::SeqCst) { break libc::SIGINT },
            }
        };
        close_all();
        // SAFETY: restores the default action of a signal and raises it, ending the process
        // as the signal would have without handlers; no other thread relies on the handler.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    });
    Ok(())
}

/// One side's forwarding: what it forwards and the ssh process doing it.
pub struct Tunnel {
    side: Side,
    dest: Destination,
    options: Vec<SshOption>,
    forwards: Vec<Forward>,
    dir: PathBuf,
    pid: u32,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// ssh's stderr lines when the forwards came up (later ones happened during the run).
    lines_at_start: usize,
}

/// Lines of ssh's stderr worth showing: not the known-hosts notices.
fn worth_showing(lines: &VecDeque<String>, from: usize) -> Vec<String> {
    lines
        .iter()
        .skip(from)
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .collect()
}

impl Tunnel {
    /// Starts ssh and waits until it listens on every local end.
    async fn open(side: Side, dest: Destination, options: Vec<SshOption>, forwards: Vec<Forward>) -> Result<Self> {
        let what = format!("{} {dest}", side.flag());
        let dir = tempfile::Builder::new()
            .prefix(&format!("row-migrate-{}-", side.key()))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .with_context(|| format!("{what}: cannot make a directory for the forwarded sockets"))?;
        let path = dir.path().to_path_buf();
        if let Some(f) = forwards.iter().find(|f| path.join(&f.name).as_os_str().len() > SUN_PATH_MAX) {
            bail!(
                "{what}: {} is too long for a Unix socket: set TMPDIR to a shorter directory",
                path.join(&f.name).display()
            );
        }
        let mut cmd = Command::new(SSH);
        cmd.args(ssh_args(&dest, &options, &path, &forwards))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal goes to row-migrate alone, which
            // still needs the forwards to roll back.
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the child between fork and exec and calls only prctl(2),
        // getppid(2) and the error constructor, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // ssh goes with row-migrate even when row-migrate is killed outright. (The
                // signal is tied to the thread that forks: the main thread of row-migrate's
                // single-threaded runtime, which lives as long as the process.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("row-migrate exited"));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("{what}: cannot run {SSH} (OpenSSH's client)"))?;
        let pid = child.id();
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let lines = stderr.clone();
            let label = dest.to_string();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    tracing::info!("ssh {label}: {line}");
                    let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                    if l.len() == STDERR_LINES {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            });
        }
        running().push(Running { child, dir: Some(dir) });
        let tunnel = Tunnel { side, dest, options, forwards, dir: path, pid, stderr, lines_at_start: 0 };
        let lines_at_start = tunnel.wait_listening(&what).await?;
        Ok(Tunnel { lines_at_start, ..tunnel })
    }

    /// Waits until ssh listens on every local end; returns how many stderr lines it printed.
    async fn wait_listening(&self, what: &str) -> Result<usize> {
        let wait = Duration::from_secs(connect_timeout(&self.options)) + LOGIN_TIME;
        let started = Instant::now();
        let locals: Vec<PathBuf> = self.forwards.iter().map(|f| self.dir.join(&f.name)).collect();
        loop {
            if let Some(status) = exit_status(self.pid) {
                // Its last words may still be on their way through the pipe.
                tokio::time::sleep(Duration::from_millis(100)).await;
                bail!(
                    "{what}: ssh exited with {} before it forwarded the {} sockets: {}",
                    describe(status),
                    self.side.name(),
                    self.said(0).unwrap_or_else(|| "it said nothing".into())
                );
            }
            let up = match std::fs::read_to_string("/proc/net/unix") {
                Ok(text) => {
                    let listening = listening(&text);
                    locals.iter().all(|p| listening.contains(p))
                }
                Err(_) => locals.iter().all(|p| p.exists()),
            };
            if up {
                let n = self.stderr.lock().unwrap_or_else(|e| e.into_inner()).len();
                tracing::info!("{what}: {} socket(s) forwarded in {} ms", locals.len(), started.elapsed().as_millis());
                return Ok(n);
            }
            if started.elapsed() >= wait {
                bail!(
                    "{what}: ssh did not forward the {} sockets within {} s (no password prompt is shown: log in \
                     with a key or an agent, e.g. --{}-option IdentityFile=PATH): {}",
                    self.side.name(),
                    wait.as_secs(),
                    self.side.key(),
                    self.said(0).unwrap_or_else(|| "it said nothing".into())
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// What ssh printed on stderr from line `from` on, as one line.
    fn said(&self, from: usize) -> Option<String> {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let shown = worth_showing(&lines, from);
        let shown: Vec<&str> = shown.iter().map(|l| l.strip_prefix("ssh: ").unwrap_or(l)).collect();
        (!shown.is_empty()).then(|| format!("ssh: {}", shown.join("; ")))
    }

    /// The local end of a forward.
    fn local(&self, f: &Forward) -> PathBuf {
        self.dir.join(&f.name)
    }

    /// A forward as messages name it: `HOST:REMOTE`.
    fn remote(&self, f: &Forward) -> String {
        format!("{}:{}", self.dest, f.remote.display())
    }

    /// What the report says about it.
    fn report(&self) -> Value {
        json!({
            "destination": self.dest.to_string(),
            "options": self.options.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "sockets": self.forwards.iter().map(|f| json!({ "flag": f.flag, "path": f.remote })).collect::<Vec<_>>(),
        })
    }

    /// What the message of a failed run should add about ssh: how it ended, if it did, and what
    /// it printed during the run (e.g. a socket sshd could not open).
    fn note(&self) -> Option<String> {
        let exited = exit_status(self.pid).map(|s| format!("ssh to {} exited with {}", self.dest, describe(s)));
        let said = self.said(self.lines_at_start);
        let hint = said.as_deref().filter(|s| s.contains("open failed")).map(|_| {
            format!(
                "sshd on {} could not open a forwarded socket: is it there, and may this user forward it \
                 (sshd's AllowStreamLocalForwarding; restrict or no-port-forwarding on the key)?",
                self.dest.host
            )
        });
        let parts: Vec<String> = [exited, said, hint].into_iter().flatten().collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// The tunnels of one run (none without `--dst-ssh`/`--src-ssh`); closed when dropped.
pub struct Tunnels {
    list: Vec<Tunnel>,
}

impl Tunnels {
    /// Opens the tunnels the command line asks for and points `args` at their local ends.
    /// A command line whose disks do not add up opens none: the run refuses it with its usual
    /// message before contacting anything.
    pub async fn open(args: &mut Args) -> Result<Self, Failure> {
        let mut tunnels = Tunnels { list: Vec::new() };
        let sides: Vec<(Side, Destination, Vec<SshOption>)> = [
            args.src_ssh.clone().map(|d| (Side::Source, d, args.src_ssh_option.clone())),
            args.dst_ssh.clone().map(|d| (Side::Destination, d, args.dst_ssh_option.clone())),
        ]
        .into_iter()
        .flatten()
        .collect();
        if sides.is_empty() || disk_specs(args).is_err() {
            return Ok(tunnels);
        }
        let refused = |e: anyhow::Error| Failure {
            code: exit::REFUSED,
            error: e.context("nothing was changed"),
            state: Value::Null,
        };
        spawn_signal_guard().map_err(refused)?;
        for (side, dest, options) in sides {
            let forwards = plan(side, &dest, &sockets(args, side)).map_err(|e| refused(anyhow!(e)))?;
            let tunnel = Tunnel::open(side, dest, options, forwards).await.map_err(refused)?;
            point_at(args, &tunnel);
            tunnels.list.push(tunnel);
        }
        Ok(tunnels)
    }

    /// Adds the tunnels to the report, or what ssh has to say to the error (naming the sockets
    /// by their remote paths rather than their local ends); then closes them.
    pub fn finish(self, result: Result<Value, Failure>) -> Result<Value, Failure> {
        if self.list.is_empty() {
            return result;
        }
        let result = match result {
            Ok(mut report) => {
                if let Some(object) = report.as_object_mut() {
                    for t in &self.list {
                        object.insert(t.side.key().to_string(), t.report());
                    }
                }
                Ok(report)
            }
            Err(Failure { code, error, state }) => {
                // What ssh printed about a connection it just closed may still be in the pipe.
                std::thread::sleep(STDERR_SETTLE);
                let mut text = format!("{error:#}");
                for t in &self.list {
                    for f in &t.forwards {
                        text = text.replace(&t.local(f).display().to_string(), &t.remote(f));
                    }
                    if let Some(note) = t.note() {
                        text = format!("{text} ({note})");
                    }
                }
                Err(Failure { code, error: anyhow!(text), state })
            }
        };
        drop(self);
        result
    }
}

impl Drop for Tunnels {
    /// Ends every ssh process row-migrate started, also one whose tunnel did not come up.
    fn drop(&mut self) {
        close_all();
    }
}

/// Points the command line's sockets of the tunnel's side at their local ends.
fn point_at(args: &mut Args, t: &Tunnel) {
    let mut locals = t.forwards.iter().map(|f| t.local(f));
    let source = t.side == Side::Source;
    let (qmp, single) =
        if source { (&mut args.src_qmp, &mut args.src_proxy) } else { (&mut args.dst_qmp, &mut args.dst_proxy) };
    if let Some(qmp) = qmp.as_mut() {
        if let Some(p) = locals.next() {
            *qmp = p;
        }
    }
    if let Some(single) = single.as_mut() {
        if let Some(p) = locals.next() {
            *single = p;
        }
    }
    for disk in &mut args.disks {
        if let Some(p) = locals.next() {
            if source {
                disk.src_proxy = p;
            } else {
                disk.dst_proxy = p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn dest(s: &str) -> Destination {
        parse_destination(s).unwrap()
    }

    #[test]
    fn destinations_are_user_at_host() {
        assert_eq!(dest("root@host-b"), Destination { user: Some("root".into()), host: "host-b".into() });
        assert_eq!(dest("host-b.example.org"), Destination { user: None, host: "host-b.example.org".into() });
        assert_eq!(dest("root@192.0.2.2").to_string(), "root@192.0.2.2");
        assert_eq!(dest("root@fd00::2").host, "fd00::2");
        assert_eq!(dest("fe80::1%eth0").host, "fe80::1%eth0");
        for (bad, why) in [
            ("", "no host"),
            ("root@", "no host"),
            ("@host", "no user"),
            ("-oProxyCommand=x", "no host"),
            ("-l@host", "no user"),
            ("root@-host", "no host"),
            ("a@b@c", "more than one @"),
            ("root@host-b:2222", "Port=PORT"),
            ("ssh://root@host-b", "no URI"),
            ("root@[::1]", "without brackets"),
            ("root@host b", "no host"),
            ("ro ot@host", "no user"),
            ("root@host/x", "no host"),
        ] {
            let e = parse_destination(bad).unwrap_err();
            let e = if why == "no host" {
                e.contains("is no host")
            } else if why == "no user" {
                e.contains("is no user")
            } else {
                e.contains(why)
            };
            assert!(e, "{bad:?}: {:?}", parse_destination(bad));
        }
    }

    #[test]
    fn options_are_ssh_config_keywords_with_values() {
        let o = parse_option("IdentityFile=/root/.ssh/id_ed25519").unwrap();
        assert_eq!(o, SshOption { key: "IdentityFile".into(), value: "/root/.ssh/id_ed25519".into() });
        assert_eq!(parse_option("Port 2222").unwrap().to_string(), "Port=2222");
        assert_eq!(parse_option(" Port = 2222 ").unwrap().to_string(), "Port=2222");
        assert_eq!(parse_option("UserKnownHostsFile=/dev/null").unwrap().value, "/dev/null");
        assert_eq!(parse_option("ProxyJump=jump@gw").unwrap().to_string(), "ProxyJump=jump@gw");
        for bad in ["Port", "Port=", "=22", "Po-rt=22", "Port=22\nLocalForward=x", "-p=22"] {
            assert!(parse_option(bad).is_err(), "{bad:?}");
        }
        for reserved in
            ["ExitOnForwardFailure=no", "controlpath=/tmp/x", "LocalForward 1:h:2", "ForkAfterAuthentication=yes"]
        {
            let e = parse_option(reserved).unwrap_err();
            assert!(e.contains("sets") && e.contains("itself"), "{reserved}: {e}");
        }
        assert_eq!(connect_timeout(&[]), CONNECT_TIMEOUT);
        assert_eq!(connect_timeout(&[parse_option("connecttimeout=3").unwrap()]), 3);
    }

    fn args(extra: &[&str]) -> Args {
        let base = ["row-migrate", "--src-qmp", "/a/qmp", "--dst-qmp", "/b/qmp", "--mem-uri", "tcp:h:1"];
        Args::try_parse_from(base.iter().chain(extra)).unwrap()
    }

    #[test]
    fn every_socket_of_a_side_is_forwarded_with_its_flag() {
        let a = args(&[
            "--src-proxy",
            "/a/1.ctl",
            "--dst-proxy",
            "/b/1.ctl",
            "--disk-uri",
            "tcp:h:2",
            "--disk",
            "/a/2.ctl,/b/2.ctl,tcp:h:3",
            "--dst-ssh",
            "root@h",
        ]);
        let dst = sockets(&a, Side::Destination);
        let flags: Vec<&str> = dst.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(flags, ["--dst-qmp", "--dst-proxy", "--disk #1 (destination)"]);
        let paths: Vec<&Path> = dst.iter().map(|(_, p)| p.as_path()).collect();
        assert_eq!(paths, [Path::new("/b/qmp"), Path::new("/b/1.ctl"), Path::new("/b/2.ctl")]);
        let src = sockets(&a, Side::Source);
        assert_eq!(src[2], ("--disk #1 (source)".to_string(), PathBuf::from("/a/2.ctl")));
        let plan = plan(Side::Destination, &dest("root@h"), &dst).unwrap();
        let names: Vec<&str> = plan.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["dst-qmp.sock", "dst-disk1.sock", "dst-disk2.sock"]);

        // Pointing the command line at the local ends keeps the order.
        let mut a = a;
        let t = Tunnel {
            side: Side::Destination,
            dest: dest("root@h"),
            options: Vec::new(),
            forwards: plan,
            dir: PathBuf::from("/tmp/t"),
            pid: 0,
            stderr: Arc::default(),
            lines_at_start: 0,
        };
        point_at(&mut a, &t);
        assert_eq!(a.dst_qmp(), Path::new("/tmp/t/dst-qmp.sock"));
        assert_eq!(a.dst_proxy.as_deref(), Some(Path::new("/tmp/t/dst-disk1.sock")));
        assert_eq!(a.disks[0].dst_proxy, Path::new("/tmp/t/dst-disk2.sock"));
        assert_eq!(a.disks[0].src_proxy, Path::new("/a/2.ctl"), "the other side stays");
        assert_eq!(t.remote(&t.forwards[2]), "root@h:/b/2.ctl");
    }

    #[test]
    fn remote_paths_are_absolute_distinct_and_forwardable() {
        let d = dest("h");
        let s = |v: &[(&str, &str)]| v.iter().map(|(f, p)| (f.to_string(), PathBuf::from(p))).collect::<Vec<_>>();
        let e = plan(Side::Destination, &d, &s(&[("--dst-qmp", "run/qmp.sock")])).unwrap_err();
        assert!(e.contains("must be absolute"), "{e}");
        let e = plan(Side::Destination, &d, &s(&[("--dst-qmp", "/run/a:b")])).unwrap_err();
        assert!(e.contains("colon"), "{e}");
        let e = plan(Side::Destination, &d, &s(&[("--dst-qmp", "/run/x"), ("--dst-proxy", "/run/x")])).unwrap_err();
        assert_eq!(e, "--dst-qmp and --dst-proxy are the same socket on h (/run/x): each names a different component");
    }

    #[test]
    fn ssh_arguments_put_row_migrates_options_first_and_the_destination_last() {
        let opts = vec![parse_option("Port=2222").unwrap(), parse_option("BatchMode=no").unwrap()];
        let forwards = plan(
            Side::Destination,
            &dest("root@h"),
            &[("--dst-qmp".into(), "/run/b/qmp.sock".into()), ("--dst-proxy".into(), "/run/b/vm.ctl".into())],
        )
        .unwrap();
        let args: Vec<String> = ssh_args(&dest("root@h"), &opts, Path::new("/tmp/d"), &forwards)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let o: Vec<&str> = args.windows(2).filter(|w| w[0] == "-o").map(|w| w[1].as_str()).collect();
        assert_eq!(
            o,
            [
                "ExitOnForwardFailure=yes",
                "StreamLocalBindUnlink=yes",
                "ControlMaster=no",
                "ControlPath=none",
                "Port=2222",
                "BatchMode=no",
                "BatchMode=yes",
                "ConnectTimeout=10",
                "ServerAliveInterval=15",
                "ServerAliveCountMax=3"
            ]
        );
        // ssh takes an option's first value: the user's BatchMode=no wins over the default.
        let first = |key: &str| o.iter().position(|x| x.starts_with(key)).unwrap();
        assert!(first("BatchMode") == 5);
        let l: Vec<&str> = args.windows(2).filter(|w| w[0] == "-L").map(|w| w[1].as_str()).collect();
        assert_eq!(l, ["/tmp/d/dst-qmp.sock:/run/b/qmp.sock", "/tmp/d/dst-disk1.sock:/run/b/vm.ctl"]);
        assert_eq!(&args[..2], ["-N", "-T"]);
        assert_eq!(&args[args.len() - 2..], ["--", "root@h"]);
    }

    #[test]
    fn listening_sockets_are_read_from_proc_net_unix() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path
0000000047aaffed: 00000002 00000000 00010000 0001 01 347054 /tmp/d/dst-qmp.sock
0000000047aaffee: 00000003 00000000 00000000 0001 03 347060 /tmp/d/dst-disk1.sock
00000000bc5ee7f2: 00000002 00000000 00010000 0001 01  4705 /tmp/d/with space.sock
00000000bc5ee7f3: 00000002 00000000 00010000 0001 01 347056 @abstract
00000000bc5ee7f4: 00000002 00000000 00000000 0002 01 347057
";
        let l = listening(text);
        assert!(l.contains(Path::new("/tmp/d/dst-qmp.sock")));
        assert!(l.contains(Path::new("/tmp/d/with space.sock")));
        assert!(!l.contains(Path::new("/tmp/d/dst-disk1.sock")), "connected, not listening");
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn the_known_hosts_notice_is_not_worth_showing() {
        let lines: VecDeque<String> = [
            "Warning: Permanently added '[192.0.2.2]:2222' (ED25519) to the list of known hosts.",
            "channel 3: open failed: connect failed: open failed",
            "",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(worth_showing(&lines, 0), ["channel 3: open failed: connect failed: open failed"]);
        assert!(worth_showing(&lines, 2).is_empty());
    }
}
