//! Two hosts with a TCG guest each, for the tests that migrate real VMs: network namespaces,
//! a proxy and a QEMU per host, `row-migrate` runs, and the logs of everything on a failure.
//!
//! The guest runs `row-workload` on its virtio disk (a 4 KiB block writer that verifies every
//! block it wrote); each [`Side`] is one incarnation of a host (its image, sockets, console).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::migration::key_file;
use crate::*;

/// One QEMU test at a time: two TCG guests already fill two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the one-QEMU-test-at-a-time lock.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `receive --listen` port (row, bitmap).
pub const DISK_PORT: u16 = 10810;
/// `serve --tcp` port of the destination (qemu-mirror).
pub const MIRROR_PORT: u16 = 10809;
/// QEMU's incoming memory migration port.
pub const MEM_PORT: u16 = 4444;
/// The proxies' export name.
pub const EXPORT: &str = "vm1";

/// The disk: 128 MiB with 32 MiB of random data at 64 MiB for round 1 (or the mirror) to carry;
/// the guest writes blocks 256.. (1 MiB ..) of the area below it.
pub const DISK_SIZE: u64 = 128 << 20;
/// Where the source's random data lies.
pub const DATA_OFFSET: u64 = 64 << 20;
/// How much random data the source has (round 1 or the mirror carries it).
pub const DATA_LEN: u64 = 32 << 20;
/// First block of the guest's write area.
pub const FIRST_BLOCK: u64 = 256;
/// Blocks in the guest's write area.
pub const AREA_BLOCKS: u64 = 8192;
/// Blocks in its hot set.
pub const HOT_BLOCKS: u64 = 256;
/// Writes per second.
pub const RATE: u64 = 200;
/// Guest RAM (MiB).
pub const GUEST_MB: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Small helpers

/// Polls `f` every 50 ms until it returns `Some`; panics with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One QMP command on a fresh connection (QEMU's monitor or a proxy's control socket); `Err`
/// when the socket is gone or the command fails. Unlike [`ControlClient`] it never panics, so
/// it can ask a process that may have died (a dead one refuses the connection at once; a live
/// one busy with I/O or TCG is given up to [`HANG_LIMIT`] to answer).
pub fn qmp(path: &Path, command: &str, arguments: Value) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = qmp_proto::Client::connect(path, HANG_LIMIT).await.map_err(|e| e.to_string())?;
        c.execute(command, arguments, HANG_LIMIT).await.map_err(|e| e.to_string())
    })
}

/// A file's text with carriage returns removed (empty when missing).
pub fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).map(|s| s.replace('\r', "")).unwrap_or_default()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// Which host.
pub enum HostId {
    /// Host A (the first source).
    A,
    /// Host B.
    B,
}

impl HostId {
    /// The host's address on the veth link.
    pub fn addr(self) -> &'static str {
        match self {
            HostId::A => ADDR_A,
            HostId::B => ADDR_B,
        }
    }
}

/// What a host's proxy is started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`, the migration source.
    Source,
    /// `receive --listen ADDR:10810` (row, bitmap).
    Receive,
    /// `serve --tcp ADDR:10809`, qemu-mirror's target.
    MirrorTarget,
}

/// One incarnation of a host: a proxy and a QEMU in its namespace, with their files in `dir`.
pub struct Side {
    /// Which host this is an incarnation of.
    pub host: HostId,
    /// Its network namespace.
    pub ns: String,
    /// Its name in logs (`a1`, `b2`, ...).
    pub name: String,
    /// Its disk image.
    pub image: PathBuf,
    /// Its proxy's NBD socket.
    pub nbd: PathBuf,
    /// Its proxy's control socket.
    pub ctl: PathBuf,
    /// QMP socket for row-migrate.
    pub qmp: PathBuf,
    /// A second QMP monitor for the test (QEMU's QMP serves one client per socket).
    pub mon: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
    /// Its proxy, while running.
    pub proxy: Option<Proc>,
    /// Its QEMU, while running.
    pub qemu: Option<Proc>,
    /// Extra environment of its proxy (e.g. the `NBD_ROW_PAUSE` test hook).
    pub proxy_env: Vec<(String, String)>,
    /// The TLS credentials its proxy uses (the rig's lab PKI).
    pub tls_creds: Option<PathBuf>,
    /// How its guests run.
    pub guest: Guest,
    /// The port its proxy listens on as [`Role::Receive`].
    pub disk_port: u16,
    /// The NBD socket of a second disk (another side's proxy) its QEMU attaches as /dev/vdb;
    /// the guest then runs a second workload there (seed 2), beside the one on /dev/vda.
    pub second_disk: Option<PathBuf>,
}

/// How a side's guest runs: what `row-workload` does, and how its drive behaves on errors.
#[derive(Debug, Clone)]
pub struct Guest {
    /// Extra `row-workload` arguments after the area options (e.g. `--sync`).
    pub workload: Vec<String>,
    /// The drive waits for a restarted proxy (NBD `reconnect-delay`) and pauses the guest on an
    /// I/O error (`werror=stop,rerror=stop`) instead of failing its I/O.
    pub resilient: bool,
    /// An incoming guest waits paused after its migration (`-S`), as libvirt starts it, until
    /// someone sends `cont`.
    pub paused_incoming: bool,
}

impl Default for Guest {
    fn default() -> Self {
        Self { workload: vec!["--verify".into()], resilient: false, paused_incoming: false }
    }
}

/// The `row-workload` options that place its area on the disk (the same for a verify-only run).
pub fn workload_area() -> Vec<String> {
    ["--device", "/dev/vda", "--first-block", &FIRST_BLOCK.to_string(), "--area-blocks", &AREA_BLOCKS.to_string()]
        .into_iter()
        .chain(["--hot-blocks", &HOT_BLOCKS.to_string()])
        .map(str::to_string)
        .collect()
}

impl Side {
    /// A side in `DIR/NAME`, nothing started.
    pub fn new(host: HostId, ns: &str, dir: &Path, name: &str) -> Self {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            host,
            ns: ns.to_string(),
            name: name.to_string(),
            image: dir.join("disk.raw"),
            nbd: dir.join("nbd.sock"),
            ctl: dir.join("ctl.sock"),
            qmp: dir.join("qmp.sock"),
            mon: dir.join("mon.sock"),
            console: dir.join("console.log"),
            proxy: None,
            qemu: None,
            proxy_env: Vec::new(),
            tls_creds: None,
            guest: Guest::default(),
            disk_port: DISK_PORT,
            second_disk: None,
        }
    }

    /// Starts the proxy as `role` in the namespace.
    pub fn start_proxy(&mut self, role: Role, key: &Path) {
        let sub = if role == Role::Receive { "receive" } else { "serve" };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(bin("nbd-row-proxy"))
            .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&self.image))
            .arg(sub)
            .arg("--image")
            .arg(&self.image)
            .arg("--socket")
            .arg(&self.nbd)
            .args(["--export", EXPORT])
            .arg("--control")
            .arg(&self.ctl)
            .arg("--auth-key-file")
            .arg(key);
        if let Some(dir) = &self.tls_creds {
            cmd.arg("--tls-creds").arg(dir);
        }
        match role {
            Role::Source => {}
            Role::Receive => {
                cmd.args(["--listen", &format!("{}:{}", self.host.addr(), self.disk_port)]);
            }
            Role::MirrorTarget => {
                cmd.args(["--tcp", &format!("{}:{MIRROR_PORT}", self.host.addr())]);
            }
        }
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        cmd.envs(self.proxy_env.iter().map(|(k, v)| (k, v)));
        let log = self.image.with_file_name("proxy.log");
        let mut proc = Proc::spawn(&format!("proxy {} ({sub})", self.name), &mut cmd, &log);
        proc.wait_for_socket(&self.nbd);
        proc.wait_for_socket(&self.ctl);
        self.proxy = Some(proc);
    }

    /// Starts QEMU running `row-workload` for `seconds` (as [`Side::guest`] says); `incoming`
    /// adds `-incoming defer`.
    pub fn start_qemu(&mut self, seconds: u32, incoming: bool) {
        let mut args = workload_area();
        args.extend(["--rate".to_string(), RATE.to_string(), "--seconds".into(), seconds.to_string()]);
        args.extend(self.guest.workload.iter().cloned());
        self.start_guest(&args, incoming);
    }

    /// The workload's arguments for the second disk: the same run on /dev/vdb with seed 2.
    fn second_workload(args: &[String]) -> Vec<String> {
        let mut second: Vec<String> =
            args.iter().map(|a| if a == "/dev/vda" { "/dev/vdb".to_string() } else { a.clone() }).collect();
        second.extend(["--seed".to_string(), "2".to_string()]);
        second
    }

    /// Starts QEMU running `row-workload` with `args`; `incoming` adds `-incoming defer`.
    pub fn start_guest(&mut self, args: &[String], incoming: bool) {
        // A guest booted again on this host gets a fresh console; the last one's is kept beside it
        // (the console is opened for appending, so nothing an earlier QEMU wrote is lost).
        if std::fs::metadata(&self.console).is_ok_and(|m| m.len() > 0) {
            let mut n = 1;
            while self.console.with_extension(format!("{n}.log")).exists() {
                n += 1;
            }
            let _ = std::fs::rename(&self.console, self.console.with_extension(format!("{n}.log")));
        }
        let mut cmd = guest_command();
        cmd.args(["--netns", &self.ns, "--socket"])
            .arg(&self.nbd)
            .args(["--export", EXPORT, "--mem", &GUEST_MB.to_string(), "--console"])
            .arg(&self.console)
            .arg("--qmp")
            .arg(&self.qmp)
            .arg("--qmp")
            .arg(&self.mon)
            .args(["--cmd", "row-workload", "--args", &args.join(",")]);
        if let Some(second) = &self.second_disk {
            cmd.arg("--socket2").arg(second).args(["--args2", &Self::second_workload(args).join(",")]);
        }
        if self.guest.resilient {
            cmd.arg("--resilient");
        }
        if incoming {
            cmd.arg("--incoming");
            if self.guest.paused_incoming {
                cmd.args(["--", "-S"]);
            }
        }
        let log = self.image.with_file_name("qemu.log");
        let mut proc = Proc::spawn(&format!("qemu {}", self.name), &mut cmd, &log);
        proc.wait_for_socket(&self.mon);
        self.qemu = Some(proc);
    }

    /// The guest's console so far.
    pub fn console_text(&self) -> String {
        read_text(&self.console)
    }

    /// Waits until the console shows `needle`; panics with the console if QEMU exits first
    /// (after a last look) or `timeout` passes.
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.console_text();
            if text.contains(needle) {
                return text;
            }
            if let Some(q) = self.qemu.as_mut() {
                if let Some(status) = q.child.try_wait().unwrap() {
                    let text = self.console_text();
                    if text.contains(needle) {
                        return text;
                    }
                    panic!(
                        "qemu {} exited ({status}) before its console showed {needle:?}; console:\n{text}",
                        self.name
                    );
                }
            }
            assert!(
                start.elapsed() < timeout,
                "the console of {} did not show {needle:?} within {timeout:?}; console:\n{text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The guest's run state from the test's monitor, or `None` when QEMU is gone.
    pub fn qemu_status(&mut self) -> Option<String> {
        if !self.qemu.as_mut().is_some_and(|q| matches!(q.child.try_wait(), Ok(None))) {
            return None;
        }
        qmp(&self.mon, "query-status", json!({})).ok().map(|s| s["status"].as_str().unwrap_or_default().to_string())
    }

    /// The proxy's `query-status`.
    pub fn proxy_status(&self) -> Value {
        qmp(&self.ctl, "query-status", json!({})).unwrap_or_else(|e| panic!("query-status on proxy {}: {e}", self.name))
    }

    /// The proxy's `query-migrate`.
    pub fn proxy_migration(&self) -> Value {
        qmp(&self.ctl, "query-migrate", json!({}))
            .unwrap_or_else(|e| panic!("query-migrate on proxy {}: {e}", self.name))
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill_qemu(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            signal(q.pid(), libc::SIGKILL);
            q.wait_or_kill(Duration::from_secs(10));
        }
    }

    /// Kills the proxy (SIGKILL) and reaps it.
    pub fn kill_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            signal(p.pid(), libc::SIGKILL);
            p.wait_or_kill(Duration::from_secs(10));
        }
    }

    /// Everything this side ran, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (what, file) in [
            ("console", self.console.clone()),
            ("qemu stderr", self.image.with_file_name("qemu.log")),
            ("proxy log", self.image.with_file_name("proxy.log")),
        ] {
            let text = read_text(&file);
            if !text.is_empty() {
                out.push_str(&format!("----- {} {what} (last 40 lines)\n{}\n", self.name, tail(&text, 40)));
            }
        }
        out
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.kill_qemu();
        if let Some(mut p) = self.proxy.take() {
            p.terminate(Duration::from_secs(5));
        }
    }
}

/// The two-host fixture: namespaces, a key, and a side per host (`a` may be replaced by a new
/// incarnation for a migration back). Stops everything by pid, then deletes the namespaces;
/// on a panic it prints the tail of every log first.
pub struct Rig {
    /// Every incarnation of each host, oldest first.
    pub sides: Vec<Side>,
    /// The namespaces.
    pub net: TwoHosts,
    /// The migration key file.
    pub key: PathBuf,
    /// The lab PKI every proxy and QEMU uses (TLS for the disk stream, the RAM and the mirror).
    pub pki: PathBuf,
    /// Where everything lives.
    pub dir: tempfile::TempDir,
    /// When the rig started.
    pub t0: Instant,
    /// row-migrate's stderr files, for the failure dump.
    pub driver_logs: Vec<PathBuf>,
    /// Extra environment of `row-migrate` runs (e.g. the `NBD_ROW_PAUSE` test hook).
    pub driver_env: Vec<(String, String)>,
}

/// A `row-migrate` run.
pub struct Driver {
    /// The process.
    pub proc: Proc,
    /// When it started.
    pub started: Instant,
    /// Its stdout file.
    pub stdout: PathBuf,
    /// Its stderr file.
    pub stderr: PathBuf,
}

/// A finished `row-migrate` run.
pub struct DriverResult {
    /// Whether it exited 0.
    pub success: bool,
    /// The exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
    /// How long it ran.
    pub seconds: f64,
}

impl Driver {
    /// Waits for the exit (killing it after `timeout`, which fails the test).
    pub fn wait(mut self, timeout: Duration) -> DriverResult {
        let start = Instant::now();
        let status = self.proc.wait_or_kill(timeout);
        let seconds = self.started.elapsed().as_secs_f64();
        let res = DriverResult {
            success: status.success(),
            code: status.code(),
            stdout: read_text(&self.stdout),
            stderr: read_text(&self.stderr),
            seconds,
        };
        assert!(
            start.elapsed() < timeout,
            "row-migrate did not exit within {timeout:?} (killed); stderr:\n{}",
            res.stderr
        );
        res
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Rig {
    /// Namespaces, a key, the source image with data, the source proxy and QEMU on A (its
    /// guest writes for `seconds`), and on B the destination proxy as `dst_role` and QEMU with
    /// `-incoming defer`. Returns once the guest reports its first writes.
    pub fn start(dst_role: Role, seconds: u32) -> Self {
        Self::start_with(dst_role, seconds, Guest::default(), &[])
    }

    /// Like [`Rig::start`], with `guest` on both sides and `proxy_env` for every proxy.
    pub fn start_with(dst_role: Role, seconds: u32, guest: Guest, proxy_env: &[(&str, &str)]) -> Self {
        Self::start_on_link(dst_role, seconds, guest, proxy_env, None)
    }

    /// Like [`Rig::start_with`], the hosts' link limited to `rate` (tbf, e.g. `100mbit`).
    pub fn start_on_link(
        dst_role: Role,
        seconds: u32,
        guest: Guest,
        proxy_env: &[(&str, &str)],
        rate: Option<&str>,
    ) -> Self {
        let t0 = Instant::now();
        let net = TwoHosts::create(rate);
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "qemu-migrate-test-key-0123456789abcdef");
        let pki = lab_pki(&dir.path().join("pki"));
        let mut a = Side::new(HostId::A, &net.a, dir.path(), "a1");
        let mut b = Side::new(HostId::B, &net.b, dir.path(), "b1");
        for side in [&mut a, &mut b] {
            side.tls_creds = Some(pki.clone());
            side.guest = guest.clone();
            side.proxy_env = proxy_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        }
        sparse_file(&a.image, DISK_SIZE);
        sparse_file(&b.image, DISK_SIZE);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&a.image).unwrap();
            f.write_all_at(&random_bytes(0x5eed, DATA_LEN as usize), DATA_OFFSET).unwrap();
        }
        a.start_proxy(Role::Source, &key);
        b.start_proxy(dst_role, &key);
        let mut rig =
            Self { sides: Vec::new(), net, key, pki, dir, t0, driver_logs: Vec::new(), driver_env: Vec::new() };
        rig.sides.push(a);
        rig.sides.push(b);
        eprintln!("[{:5.1}s] proxies up", rig.secs());
        rig.a().start_qemu(seconds, false);
        rig.b().start_qemu(seconds, true);
        eprintln!("[{:5.1}s] qemus started", rig.secs());
        rig.a().wait_console("WORKLOAD-START", HANG_LIMIT);
        eprintln!("[{:5.1}s] guest booted and writing on A", rig.secs());
        rig
    }

    /// Seconds since the rig started.
    pub fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// The newest incarnation of host A.
    pub fn a(&mut self) -> &mut Side {
        self.sides.iter_mut().rev().find(|s| s.host == HostId::A).unwrap()
    }

    /// The newest incarnation of host B.
    pub fn b(&mut self) -> &mut Side {
        self.sides.iter_mut().rev().find(|s| s.host == HostId::B).unwrap()
    }

    /// The newest incarnation of `host`.
    pub fn side(&mut self, host: HostId) -> &mut Side {
        match host {
            HostId::A => self.a(),
            HostId::B => self.b(),
        }
    }

    /// Starts a new incarnation of `host` (fresh empty image): proxy as `role`, QEMU with
    /// `-incoming defer`.
    pub fn new_side(&mut self, host: HostId, role: Role, seconds: u32) {
        let n = self.sides.iter().filter(|s| s.host == host).count() + 1;
        let (ns, prefix) = match host {
            HostId::A => (self.net.a.clone(), "a"),
            HostId::B => (self.net.b.clone(), "b"),
        };
        let mut side = Side::new(host, &ns, self.dir.path(), &format!("{prefix}{n}"));
        side.tls_creds = Some(self.pki.clone());
        sparse_file(&side.image, DISK_SIZE);
        side.start_proxy(role, &self.key);
        side.start_qemu(seconds, true);
        self.sides.push(side);
    }

    /// Starts `row-migrate --json` from `from`'s newest side to `to`'s.
    pub fn spawn_driver(&mut self, from: HostId, to: HostId, strategy: &str, extra: &[&str]) -> Driver {
        let n = self.driver_logs.len();
        let stdout = self.dir.path().join(format!("row-migrate{n}.out"));
        let stderr = self.dir.path().join(format!("row-migrate{n}.err"));
        let addr = to.addr();
        let disk_uri = if strategy == "qemu-mirror" {
            format!("nbd://{addr}:{MIRROR_PORT}/{EXPORT}")
        } else {
            format!("tcp:{addr}:{DISK_PORT}")
        };
        let (src_qmp, src_ctl) = {
            let s = self.side(from);
            (s.qmp.clone(), s.ctl.clone())
        };
        let (dst_qmp, dst_ctl) = {
            let s = self.side(to);
            (s.qmp.clone(), s.ctl.clone())
        };
        let mut cmd = Command::new(bin("row-migrate"));
        cmd.arg("--src-qmp")
            .arg(src_qmp)
            .arg("--dst-qmp")
            .arg(dst_qmp)
            .arg("--src-proxy")
            .arg(src_ctl)
            .arg("--dst-proxy")
            .arg(dst_ctl)
            .args([
                "--disk-uri",
                &disk_uri,
                "--mem-uri",
                &format!("tcp:{addr}:{MEM_PORT}"),
                "--strategy",
                strategy,
                "--json",
            ])
            .arg("--tls-creds")
            .arg(&self.pki)
            .args(extra)
            .envs(self.driver_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let started = Instant::now();
        let child = cmd.spawn().expect("cannot start row-migrate");
        self.driver_logs.push(stderr.clone());
        eprintln!("[{:5.1}s] row-migrate {from:?} -> {to:?} --strategy {strategy} {}", self.secs(), extra.join(" "));
        Driver { proc: Proc { child, name: "row-migrate".into(), log: stderr.clone() }, started, stdout, stderr }
    }

    /// Runs a migration that must succeed and returns its JSON report.
    pub fn migrate_ok(&mut self, from: HostId, to: HostId, strategy: &str, extra: &[&str]) -> Value {
        let driver = self.spawn_driver(from, to, strategy, extra);
        let res = driver.wait(HANG_LIMIT);
        assert!(res.success, "row-migrate failed after {:.1} s; stderr:\n{}", res.seconds, res.stderr);
        let line = res.stdout.lines().last().unwrap_or_default();
        let report: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("row-migrate --json printed {:?}: {e}", res.stdout));
        eprintln!("[{:5.1}s] row-migrate done in {:.1} s: {report}", self.secs(), res.seconds);
        report
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut out = String::new();
            for s in &self.sides {
                out.push_str(&s.logs());
            }
            for (i, l) in self.driver_logs.iter().enumerate() {
                out.push_str(&format!("----- row-migrate run {i} stderr\n{}\n", tail(&read_text(l), 30)));
            }
            eprintln!("===== logs of the failed test\n{out}=====");
        }
        // QEMUs first (they hold NBD connections), then the proxies, then the namespaces.
        for s in &mut self.sides {
            s.kill_qemu();
        }
        self.sides.clear();
    }
}
