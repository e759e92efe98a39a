//! `row-migrate --dst-ssh`: row-migrate runs on host A alone and reaches host B's QMP and
//! control sockets through a real sshd running in B's network namespace (a throwaway config,
//! host key and client key in the test's directory).
//!
//! row-migrate runs in A's namespace and in a mount namespace of its own where B's directory
//! (the one holding B's QEMU monitor and proxy control socket) is covered by an empty tmpfs:
//! the only way it can reach them is through ssh. Its TMPDIR is a directory of the test's, so
//! the test sees the forwarded sockets' directory come and go, and finds the ssh process by its
//! `-L` arguments.
//!
//! Cases: a writing guest migrated A -> B (refusals first: without --dst-ssh, a socket missing
//! on B, a key B does not accept); a Ctrl-C sent to row-migrate's whole process group, as a
//! terminal does, rolls back through the tunnel; SIGTERM closes the tunnel and `--recover`
//! over ssh puts the guest back on A; a wrong port or host is refused at once. After each run
//! no ssh process and no directory is left.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::rig::*;
use e2e::*;
use serde_json::{json, Value};

/// How long the guest writes (guest time): the refusals, the migration and the checks after.
const MIGRATE_SECONDS: u32 = 25;
const ROLLBACK_SECONDS: u32 = 15;
/// sshd's port in B's namespace (a fresh namespace: nothing else listens there).
const SSH_PORT: u16 = 2222;
/// The user row-migrate logs in as.
const SSH_USER: &str = "root";
/// sshd, by the absolute path it needs (it re-executes itself for each connection).
const SSHD: &str = "/usr/sbin/sshd";
/// How long a refusal may take: ssh connects, logs in (or fails to) and exits in well under a
/// second here; this only catches a wait that is not bounded.
const REFUSAL_LIMIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// sshd

/// A throwaway sshd in a network namespace: its own host key, one authorised client key, its
/// pid file and config in a temporary directory. Stopped (SIGTERM) when dropped.
struct Sshd {
    proc: Proc,
    dir: tempfile::TempDir,
    port: u16,
}

impl Sshd {
    fn start(ns: &str, addr: &str, port: u16) -> Self {
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} is missing: install openssh-server (scripts/setup, or apt-get install -y openssh-server)"
        );
        require_tool("ssh");
        require_tool("ssh-keygen");
        // sshd's privilege-separated children chroot there; the package makes it at boot.
        let privsep = Path::new("/run/sshd");
        if !privsep.is_dir() {
            std::fs::create_dir_all(privsep).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(privsep, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            run_ok(
                Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"]).arg(d.join(key)),
            );
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let config = format!(
            "ListenAddress {addr}\nPort {port}\nHostKey {host_key}\nAuthorizedKeysFile {keys}\nPidFile {pid}\n\
             UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nAllowStreamLocalForwarding yes\nLogLevel VERBOSE\n",
            host_key = d.join("host_key").display(),
            keys = d.join("authorized_keys").display(),
            pid = d.join("sshd.pid").display(),
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, SSHD, "-D", "-e", "-f"]).arg(d.join("sshd_config"));
        let mut proc = Proc::spawn(&format!("sshd in {ns}"), &mut cmd, &d.join("sshd.log"));
        wait_for_log(&mut proc, "Server listening on", HANG_LIMIT);
        Self { proc, dir, port }
    }

    /// The client key.
    fn key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// `--dst-ssh USER@ADDR` and the options that log in with `key`.
    fn args(&self, addr: &str, key: &Path) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec!["--dst-ssh".into(), format!("{SSH_USER}@{addr}").into()];
        for opt in [
            format!("Port={}", self.port),
            format!("IdentityFile={}", key.display()),
            "StrictHostKeyChecking=no".into(),
            "UserKnownHostsFile=/dev/null".into(),
        ] {
            out.push("--dst-ssh-option".into());
            out.push(opt.into());
        }
        out
    }

    fn log(&self) -> String {
        self.proc.log_text()
    }
}

// ---------------------------------------------------------------------------------------------
// row-migrate on A

/// Where row-migrate runs: A's namespace, B's directory hidden, TMPDIR the test's.
struct OnA {
    ns: String,
    /// B's directory, covered by an empty tmpfs in row-migrate's mount namespace.
    hidden: Option<PathBuf>,
    /// row-migrate's TMPDIR.
    tmp: PathBuf,
    /// Where the runs' stdout and stderr go.
    logs: PathBuf,
    runs: usize,
}

impl OnA {
    fn new(ns: &str, hidden: Option<&Path>, dir: &Path) -> Self {
        let tmp = dir.join("a-tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        Self { ns: ns.to_string(), hidden: hidden.map(Path::to_path_buf), tmp, logs: dir.to_path_buf(), runs: 0 }
    }

    /// Starts `row-migrate ARGS` (in a process group of its own when `group`, as a shell
    /// starts a foreground job).
    fn spawn(&mut self, args: &[OsString], group: bool) -> Driver {
        let n = self.runs;
        self.runs += 1;
        let stdout = self.logs.join(format!("ssh-row-migrate{n}.out"));
        let stderr = self.logs.join(format!("ssh-row-migrate{n}.err"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]);
        if let Some(hidden) = &self.hidden {
            // Every step execs the next, so the pid is row-migrate's.
            cmd.args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
                .arg("mount -t tmpfs -o size=1m hidden-from-row-migrate \"$0\" && exec \"$@\"")
                .arg(hidden);
        }
        cmd.arg(bin("row-migrate"))
            .args(args)
            .env("TMPDIR", &self.tmp)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if group {
            cmd.process_group(0);
        }
        let child = cmd.spawn().expect("cannot start row-migrate");
        let proc = Proc { child, name: "row-migrate".into(), log: stderr.clone() };
        Driver { proc, started: Instant::now(), stdout, stderr }
    }

    /// Runs `row-migrate ARGS` to the end.
    fn run(&mut self, args: &[OsString]) -> DriverResult {
        self.spawn(args, false).wait(HANG_LIMIT)
    }

    /// No ssh process of row-migrate's is left, and no forwarded sockets' directory.
    fn assert_clean(&self, after: &str) {
        let left: Vec<_> = std::fs::read_dir(&self.tmp).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "after {after}, row-migrate left {left:?} in its TMPDIR");
        // A process reaped a moment ago may still be listed while its parent's wait returns.
        let procs = wait_until_some(Duration::from_secs(5), || {
            let p = ssh_processes(&self.tmp);
            p.is_empty().then_some(p)
        });
        assert!(procs.is_some(), "after {after}, ssh still runs: {:?}", ssh_processes(&self.tmp));
    }
}

/// `f()` until it is `Some`, for up to `timeout`.
fn wait_until_some<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ssh processes whose arguments name a path under `dir` (row-migrate's `-L LOCAL:...`):
/// pid, process group and command line.
fn ssh_processes(dir: &Path) -> Vec<(u32, i32, String)> {
    let marker = dir.display().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
        let is_ssh = args.first().is_some_and(|a| a == "ssh" || a.ends_with("/ssh"));
        if is_ssh && args.iter().any(|a| a.contains(&marker)) {
            // SAFETY: getpgid(2) on a pid; a process gone meanwhile gives -1.
            let pgid = unsafe { libc::getpgid(pid as libc::pid_t) };
            out.push((pid, pgid, args.join(" ")));
        }
    }
    out
}

/// The arguments of a migration from the rig's A to its B, without --dst-ssh.
fn migration_args(rig: &mut Rig, extra: &[&str]) -> Vec<OsString> {
    let (a_qmp, a_ctl) = (rig.a().qmp.clone(), rig.a().ctl.clone());
    let (b_qmp, b_ctl) = (rig.b().qmp.clone(), rig.b().ctl.clone());
    let mut args: Vec<OsString> = Vec::new();
    for (flag, path) in [("--src-qmp", &a_qmp), ("--src-proxy", &a_ctl), ("--dst-qmp", &b_qmp), ("--dst-proxy", &b_ctl)]
    {
        args.push(flag.into());
        args.push(path.into());
    }
    for a in [
        "--disk-uri",
        &format!("tcp:{ADDR_B}:{DISK_PORT}"),
        "--mem-uri",
        &format!("tcp:{ADDR_B}:{MEM_PORT}"),
        "--strategy",
        "row",
        "--json",
    ] {
        args.push(a.into());
    }
    args.push("--tls-creds".into());
    args.push(rig.pki.clone().into());
    args.extend(extra.iter().map(OsString::from));
    args
}

/// `args` with `--dst-qmp`'s value replaced.
fn with_dst_qmp(args: &[OsString], path: &Path) -> Vec<OsString> {
    let mut out = args.to_vec();
    let i = out.iter().position(|a| a == "--dst-qmp").unwrap();
    out[i + 1] = path.into();
    out
}

/// A run refused before anything started: exit 2, one line on stderr (returned), naming
/// `keywords`, within [`REFUSAL_LIMIT`].
fn assert_refused(res: &DriverResult, what: &str, keywords: &[&str]) -> String {
    let lines: Vec<&str> = res.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    eprintln!("{what}: exit {:?} after {:.2} s: {}", res.code, res.seconds, res.stderr.trim_end());
    assert_eq!(res.code, Some(2), "{what}: want exit 2 (refused); stderr:\n{}", res.stderr);
    assert_eq!(lines.len(), 1, "{what}: want one line on stderr:\n{}", res.stderr);
    let line = lines[0];
    assert!(line.starts_with("row-migrate: nothing was changed: "), "{what}: {line}");
    for k in keywords {
        assert!(line.contains(k), "{what}: the line does not say {k:?}: {line}");
    }
    assert!(res.seconds < REFUSAL_LIMIT.as_secs_f64(), "{what}: took {:.1} s", res.seconds);
    line.to_string()
}

/// Waits until A's proxy has been in its disk pre-copy for `after`.
fn wait_precopy(rig: &mut Rig, after: Duration) {
    let a = rig.a();
    wait_until("the disk pre-copy", HANG_LIMIT, || {
        let m = a.proxy_migration();
        (m["phase"] == "precopy" && m["round"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    std::thread::sleep(after);
    let m = rig.a().proxy_migration();
    assert_eq!(m["phase"], "precopy", "the pre-copy should still run: {m}");
}

/// The one ssh process of a running row-migrate (pid `driver`): in a process group of its own.
fn assert_one_tunnel(on_a: &OnA, driver: u32) {
    let procs = ssh_processes(&on_a.tmp);
    assert_eq!(procs.len(), 1, "want one ssh process: {procs:?}");
    let (pid, pgid, cmdline) = &procs[0];
    assert_eq!(*pgid, *pid as i32, "ssh should lead its own process group: {cmdline}");
    assert_ne!(*pgid, driver as i32, "ssh is in row-migrate's process group: {cmdline}");
    assert!(cmdline.contains("-N") && cmdline.contains("ExitOnForwardFailure=yes"), "{cmdline}");
    eprintln!("tunnel: {cmdline}");
}

/// After a rollback: the guest runs on A and verifies every block there; B's never ran.
fn assert_guest_stays_on_a(rig: &mut Rig, what: &str) {
    let a = rig.a();
    assert_eq!(a.qemu_status().as_deref(), Some("running"), "{what}: the source guest does not run");
    wait_until("the source proxy back in direct mode", HANG_LIMIT, || {
        (a.proxy_status()["mode"] == "direct").then_some(())
    });
    let b_state = rig.b().qemu_status();
    assert!(b_state.as_deref() != Some("running"), "{what}: the destination guest runs: {b_state:?}");
    let text = rig.a().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "{what}: verification failed on A; console:\n{text}");
    assert!(!rig.b().console_text().contains("WORKLOAD"), "{what}: the guest printed on B");
}

// ---------------------------------------------------------------------------------------------
// Cases

#[test]
fn a_writing_guest_migrates_with_b_reached_only_through_ssh() {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, MIGRATE_SECONDS);
    let sshd = Sshd::start(&rig.net.b.clone(), ADDR_B, SSH_PORT);
    let b_dir = rig.b().qmp.parent().unwrap().to_path_buf();
    let mut on_a = OnA::new(&rig.net.a, Some(&b_dir), rig.dir.path());
    let plain = migration_args(&mut rig, &[]);
    let ssh = sshd.args(ADDR_B, &sshd.key());

    // Without ssh, B's sockets are out of reach: the hiding works.
    let res = on_a.run(&plain);
    assert_refused(&res, "without --dst-ssh", &["--dst-qmp", "cannot reach the destination QEMU"]);

    // A socket missing on B: sshd cannot open it, and the line says so.
    let missing = b_dir.join("missing.sock");
    let res = on_a.run(&[with_dst_qmp(&plain, &missing), ssh.clone()].concat());
    let line = assert_refused(&res, "a socket missing on B", &["open failed", "AllowStreamLocalForwarding"]);
    assert!(line.contains(&format!("--dst-qmp {SSH_USER}@{ADDR_B}:{}", missing.display())), "{line}");
    on_a.assert_clean("a socket missing on B");

    // A key B does not accept.
    let stranger = sshd.dir.path().join("host_key");
    let res = on_a.run(&[plain.clone(), sshd.args(ADDR_B, &stranger)].concat());
    assert_refused(&res, "a key B does not accept", &["--dst-ssh root@192.0.2.2", "Permission denied"]);
    on_a.assert_clean("a refused key");
    assert_eq!(rig.a().qemu_status().as_deref(), Some("running"), "a refusal changed the source guest");
    assert_eq!(rig.b().qemu_status().as_deref(), Some("inmigrate"), "a refusal changed the destination QEMU");

    // The migration, with the tunnel checked while it runs.
    let mut driver = on_a.spawn(&[plain.clone(), ssh, vec!["--verify-disk".into()]].concat(), false);
    rig.driver_logs.push(driver.stderr.clone());
    wait_until("row-migrate's ssh", HANG_LIMIT, || {
        if let Some(status) = driver.proc.child.try_wait().unwrap() {
            panic!("row-migrate exited ({status}) before its ssh was seen:\n{}", read_text(&driver.stderr));
        }
        (!ssh_processes(&on_a.tmp).is_empty()).then_some(())
    });
    assert_one_tunnel(&on_a, driver.pid());
    let res = driver.wait(HANG_LIMIT);
    assert!(res.success, "row-migrate failed after {:.1} s; stderr:\n{}", res.seconds, res.stderr);
    let report: Value = serde_json::from_str(res.stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("row-migrate --json printed {:?}: {e}", res.stdout));
    eprintln!("[{:5.1}s] row-migrate over ssh done in {:.1} s: {report}", rig.secs(), res.seconds);
    on_a.assert_clean("the migration");

    // The report names the tunnel and the remote sockets.
    let tunnel = &report["dst-ssh"];
    assert_eq!(tunnel["destination"], format!("{SSH_USER}@{ADDR_B}"), "{report}");
    let b_qmp = rig.b().qmp.clone();
    let b_ctl = rig.b().ctl.clone();
    assert_eq!(
        tunnel["sockets"],
        json!([{ "flag": "--dst-qmp", "path": b_qmp }, { "flag": "--dst-proxy", "path": b_ctl }]),
        "{report}"
    );
    assert_eq!(report["strategy"], "row", "{report}");
    assert!(report["downtime-ms"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    let compared = report["disk-verified"]["compared-bytes"].as_u64().unwrap_or_default();
    assert!(compared > 0, "--verify-disk compared both disks: {report}");
    let log = sshd.log();
    assert!(log.contains(&format!("Accepted publickey for {SSH_USER} from {ADDR_A}")), "sshd log:\n{log}");

    // The guest landed on B: it runs there only, keeps writing, and verifies every block.
    assert!(rig.a().qemu_status().as_deref() != Some("running"), "the source guest still runs");
    assert_eq!(rig.b().qemu_status().as_deref(), Some("running"), "the destination guest does not run");
    let status = rig.b().proxy_status();
    assert_eq!(status["mode"], "direct", "B's proxy: {status}");
    assert_eq!(status["incoming"], false, "B's proxy: {status}");
    let text = rig.b().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on B; console:\n{text}");
    assert!(text.contains("WORKLOAD written="), "the guest did not write on B after landing:\n{text}");
    let before = rig.a().console_text();
    assert!(!before.contains("WORKLOAD-WRITES-DONE"), "the guest finished writing before it moved:\n{before}");
    use std::os::unix::fs::FileExt;
    let (mut x, mut y) = (vec![0u8; DATA_LEN as usize], vec![0u8; DATA_LEN as usize]);
    std::fs::File::open(&rig.a().image).unwrap().read_exact_at(&mut x, DATA_OFFSET).unwrap();
    std::fs::File::open(&rig.b().image).unwrap().read_exact_at(&mut y, DATA_OFFSET).unwrap();
    assert!(x == y, "the data outside the guest's area differs between A and B");
    let line = text.lines().find(|l| l.starts_with("WORKLOAD-VERIFY-OK")).unwrap_or_default();
    eprintln!("[{:5.1}s] the guest verified on B: {line}", rig.secs());
    drop(sshd);
}

/// Ctrl-C at a terminal reaches the whole foreground process group: row-migrate, not its ssh
/// (a group of its own), so the rollback still reaches B through the tunnel.
#[test]
fn ctrl_c_to_the_process_group_rolls_back_through_the_tunnel() {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, ROLLBACK_SECONDS);
    let sshd = Sshd::start(&rig.net.b.clone(), ADDR_B, SSH_PORT);
    let b_dir = rig.b().qmp.parent().unwrap().to_path_buf();
    let mut on_a = OnA::new(&rig.net.a, Some(&b_dir), rig.dir.path());
    let args = [migration_args(&mut rig, &["--max-bandwidth", "4MiB"]), sshd.args(ADDR_B, &sshd.key())].concat();
    let driver = on_a.spawn(&args, true);
    rig.driver_logs.push(driver.stderr.clone());
    wait_precopy(&mut rig, Duration::from_secs(2));
    assert_one_tunnel(&on_a, driver.pid());
    // SAFETY: kill(2) on the process group of a child we started in a group of its own.
    unsafe {
        libc::kill(-(driver.pid() as libc::pid_t), libc::SIGINT);
    }
    let res = driver.wait(HANG_LIMIT);
    eprintln!("[{:5.1}s] Ctrl-C: row-migrate exited {:?}; stderr:\n{}", rig.secs(), res.code, res.stderr.trim_end());
    assert_eq!(res.code, Some(3), "want exit 3 (rolled back); stderr:\n{}", res.stderr);
    let report: Value = serde_json::from_str(res.stdout.trim()).expect("a JSON failure report");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("interrupted") && error.contains("rolled back"), "{report}");
    // The rollback reached B: its QEMU answered for the state report, through ssh.
    assert!(report["state"]["destination-qemu"]["status"].is_string(), "{report}");
    assert!(report["state"]["destination-proxy"]["incoming"].is_boolean(), "{report}");
    on_a.assert_clean("Ctrl-C");
    assert_guest_stays_on_a(&mut rig, "Ctrl-C");
    drop(sshd);
}

/// SIGTERM ends row-migrate at once, as it always did (the state is for `--recover`), and
/// takes the tunnel with it; `--recover` over ssh then puts the guest back on A.
#[test]
fn sigterm_closes_the_tunnel_and_recover_over_ssh_finishes() {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, ROLLBACK_SECONDS);
    let sshd = Sshd::start(&rig.net.b.clone(), ADDR_B, SSH_PORT);
    let b_dir = rig.b().qmp.parent().unwrap().to_path_buf();
    let mut on_a = OnA::new(&rig.net.a, Some(&b_dir), rig.dir.path());
    let ssh = sshd.args(ADDR_B, &sshd.key());
    let args = [migration_args(&mut rig, &["--max-bandwidth", "4MiB"]), ssh.clone()].concat();
    let driver = on_a.spawn(&args, false);
    rig.driver_logs.push(driver.stderr.clone());
    wait_precopy(&mut rig, Duration::from_secs(1));
    assert_one_tunnel(&on_a, driver.pid());
    signal(driver.pid(), libc::SIGTERM);
    let res = driver.wait(Duration::from_secs(30));
    assert_eq!(res.code, None, "row-migrate should die of SIGTERM; stderr:\n{}", res.stderr);
    on_a.assert_clean("SIGTERM");

    let recover = [migration_args(&mut rig, &["--recover"]), ssh].concat();
    let res = on_a.run(&recover);
    eprintln!("[{:5.1}s] --recover over ssh exited {:?}: {}", rig.secs(), res.code, res.stdout.trim());
    assert!(res.success, "--recover failed; stderr:\n{}", res.stderr);
    let report: Value = serde_json::from_str(res.stdout.lines().last().unwrap_or_default()).expect("a JSON report");
    assert_eq!(report["guest"], "source", "{report}");
    assert_eq!(report["dst-ssh"]["destination"], format!("{SSH_USER}@{ADDR_B}"), "{report}");
    on_a.assert_clean("--recover");
    assert_guest_stays_on_a(&mut rig, "SIGTERM and --recover");
    drop(sshd);
}

/// No sshd where --dst-ssh points: refused at once with ssh's reason, nothing left behind.
#[test]
fn a_wrong_ssh_port_or_host_is_refused_at_once() {
    let net = TwoHosts::create(None);
    let dir = tempfile::tempdir().unwrap();
    let mut on_a = OnA::new(&net.a, None, dir.path());
    let base: Vec<OsString> = [
        "--src-qmp",
        "/run/a/qmp.sock",
        "--src-proxy",
        "/run/a/vm1.ctl",
        "--dst-qmp",
        "/run/b/qmp.sock",
        "--dst-proxy",
        "/run/b/vm1.ctl",
        "--disk-uri",
        &format!("tcp:{ADDR_B}:{DISK_PORT}"),
        "--mem-uri",
        &format!("tcp:{ADDR_B}:{MEM_PORT}"),
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let with =
        |extra: &[&str]| -> Vec<OsString> { base.iter().cloned().chain(extra.iter().map(OsString::from)).collect() };

    // B is there, but nothing listens on the port.
    let res = on_a.run(&with(&["--dst-ssh", "root@192.0.2.2", "--dst-ssh-option", "Port=2299"]));
    assert_refused(
        &res,
        "a wrong port",
        &["--dst-ssh root@192.0.2.2: ssh exited with status 255", "port 2299: Connection refused"],
    );
    on_a.assert_clean("a wrong port");

    // No host at that address.
    let res = on_a.run(&with(&["--dst-ssh", "root@192.0.2.3", "--dst-ssh-option", "ConnectTimeout=2"]));
    assert_refused(&res, "a wrong host", &["--dst-ssh root@192.0.2.3: ssh exited with status 255", "192.0.2.3"]);
    on_a.assert_clean("a wrong host");

    // The same for the source side.
    let res = on_a.run(&with(&["--src-ssh", "root@192.0.2.2", "--src-ssh-option", "Port=2299"]));
    assert_refused(&res, "a wrong source port", &["--src-ssh root@192.0.2.2", "Connection refused"]);
    on_a.assert_clean("a wrong source port");

    // Malformed values are usage errors (exit 2) before ssh runs.
    for (extra, says) in [
        (&["--dst-ssh", "root@host-b:22"][..], "Port=PORT"),
        (&["--dst-ssh=-oProxyCommand=x"][..], "no host"),
        (&["--dst-ssh", "h", "--dst-ssh-option", "ControlPath=/tmp/x"][..], "itself"),
        (&["--dst-ssh-option", "Port=22"][..], "--dst-ssh"),
    ] {
        let res = on_a.run(&with(extra));
        assert_eq!(res.code, Some(2), "{extra:?}: {}", res.stderr);
        assert!(res.stderr.contains(says), "{extra:?}: {}", res.stderr);
        on_a.assert_clean("a usage error");
    }
    drop(net);
}
