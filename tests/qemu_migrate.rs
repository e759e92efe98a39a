//! `row-migrate` end to end: a QEMU TCG guest on "host A" (a network namespace) runs
//! `row-workload`, which writes 4 KiB blocks with O_DIRECT to a hot set at 200 writes/s and
//! keeps its ledger in guest RAM; `row-migrate` moves the running guest and its disk to "host B"
//! (another namespace, joined to A by a veth pair), and the guest then reads every block it
//! wrote back and prints WORKLOAD-VERIFY-OK on the console of whichever host it runs on.
//!
//! Cases: the three strategies (row, bitmap, qemu-mirror) with `--verify-disk`, a second
//! migration back to A, and rollbacks: the destination proxy killed, Ctrl-C, `--timeout`, the
//! network dropped, and the destination QEMU killed during the memory migration. After a
//! rollback the guest must keep running on A with no write lost (it verifies on A) and the
//! destination QEMU must never have resumed.
//!
//! The tests run one at a time (a static mutex): two TCG guests already fill two cores.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use e2e::migration::key_file;
use e2e::*;
use nbd_proto::consts::NBD_EPERM;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

/// One QEMU test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `receive --listen` port (row, bitmap).
const DISK_PORT: u16 = 10810;
/// `serve --tcp` port of the destination (qemu-mirror).
const MIRROR_PORT: u16 = 10809;
/// QEMU's incoming memory migration port.
const MEM_PORT: u16 = 4444;
const EXPORT: &str = "vm1";

/// The disk: 128 MiB with 32 MiB of random data at 64 MiB for round 1 (or the mirror) to carry;
/// the guest writes blocks 256.. (1 MiB ..) of the area below it.
const DISK_SIZE: u64 = 128 << 20;
const DATA_OFFSET: u64 = 64 << 20;
const DATA_LEN: u64 = 32 << 20;
const FIRST_BLOCK: u64 = 256;
const AREA_BLOCKS: u64 = 8192;
const HOT_BLOCKS: u64 = 256;
const RATE: u64 = 200;
/// How long the guest writes (guest time, which stands still while it is paused), per kind
/// of case: long enough to span the migrations or the rollback and its checks.
const MIGRATE_SECONDS: u32 = 15;
const BACK_AND_FORTH_SECONDS: u32 = 25;
const ROLLBACK_SECONDS: u32 = 15;
/// The network case waits for `--timeout` and a rollback with the link down.
const NETWORK_DROP_SECONDS: u32 = 20;
/// Guest RAM (MiB).
const GUEST_MB: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Small helpers

/// Polls `f` every 50 ms until it returns `Some`; panics with `what` after `timeout`.
fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
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
/// it can ask a process that may have died.
fn qmp(path: &Path, command: &str, arguments: Value) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = qmp_proto::Client::connect(path, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
        c.execute(command, arguments, Duration::from_secs(30)).await.map_err(|e| e.to_string())
    })
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).map(|s| s.replace('\r', "")).unwrap_or_default()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostId {
    A,
    B,
}

impl HostId {
    fn addr(self) -> &'static str {
        match self {
            HostId::A => ADDR_A,
            HostId::B => ADDR_B,
        }
    }
}

/// What a host's proxy is started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `serve`, the migration source.
    Source,
    /// `receive --listen ADDR:10810` (row, bitmap).
    Receive,
    /// `serve --tcp ADDR:10809`, qemu-mirror's target.
    MirrorTarget,
}

/// One incarnation of a host: a proxy and a QEMU in its namespace, with their files in `dir`.
struct Side {
    host: HostId,
    ns: String,
    name: String,
    image: PathBuf,
    nbd: PathBuf,
    ctl: PathBuf,
    /// QMP socket for row-migrate.
    qmp: PathBuf,
    /// A second QMP monitor for the test (QEMU's QMP serves one client per socket).
    mon: PathBuf,
    console: PathBuf,
    proxy: Option<Proc>,
    qemu: Option<Proc>,
}

impl Side {
    fn new(host: HostId, ns: &str, dir: &Path, name: &str) -> Self {
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
        }
    }

    fn start_proxy(&mut self, role: Role, key: &Path) {
        let sub = if role == Role::Receive { "receive" } else { "serve" };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(bin("nbd-row-proxy"))
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
        match role {
            Role::Source => {}
            Role::Receive => {
                cmd.args(["--listen", &format!("{}:{DISK_PORT}", self.host.addr())]);
            }
            Role::MirrorTarget => {
                cmd.args(["--tcp", &format!("{}:{MIRROR_PORT}", self.host.addr())]);
            }
        }
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let log = self.image.with_file_name("proxy.log");
        let proc = Proc::spawn(&format!("proxy {} ({sub})", self.name), &mut cmd, &log);
        wait_for_socket(&self.nbd, Duration::from_secs(10));
        wait_for_socket(&self.ctl, Duration::from_secs(10));
        self.proxy = Some(proc);
    }

    /// Starts QEMU running `row-workload` for `seconds`; `incoming` adds `-incoming defer`.
    fn start_qemu(&mut self, seconds: u32, incoming: bool) {
        require_tool("qemu-system-x86_64");
        static IMAGE: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
        let (kernel, initrd) = IMAGE.get_or_init(guest_image);
        let args = [
            "--device".to_string(),
            "/dev/vda".into(),
            "--first-block".into(),
            FIRST_BLOCK.to_string(),
            "--area-blocks".into(),
            AREA_BLOCKS.to_string(),
            "--hot-blocks".into(),
            HOT_BLOCKS.to_string(),
            "--rate".into(),
            RATE.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--verify".into(),
        ]
        .join(",");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-m", &GUEST_MB.to_string(), "-display", "none", "-nodefaults", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &format!("console=ttyS0 panic=-1 quiet guest.cmd=row-workload guest.args={args}")])
            .args(["-chardev", &format!("file,id=con,path={}", self.console.display()), "-serial", "chardev:con"])
            .args([
                "-drive",
                &format!("file=nbd+unix:///{EXPORT}?socket={},format=raw,if=virtio,cache=none", self.nbd.display()),
            ])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", self.qmp.display())])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", self.mon.display())]);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let log = self.image.with_file_name("qemu.log");
        let proc = Proc::spawn(&format!("qemu {}", self.name), &mut cmd, &log);
        wait_for_socket(&self.mon, Duration::from_secs(20));
        self.qemu = Some(proc);
    }

    fn console_text(&self) -> String {
        read_text(&self.console)
    }

    /// Waits until the console shows `needle`; panics with the console if QEMU exits first
    /// (after a last look) or `timeout` passes.
    fn wait_console(&mut self, needle: &str, timeout: Duration) -> String {
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
    fn qemu_status(&mut self) -> Option<String> {
        if !self.qemu.as_mut().is_some_and(|q| matches!(q.child.try_wait(), Ok(None))) {
            return None;
        }
        qmp(&self.mon, "query-status", json!({})).ok().map(|s| s["status"].as_str().unwrap_or_default().to_string())
    }

    fn proxy_status(&self) -> Value {
        qmp(&self.ctl, "query-status", json!({})).unwrap_or_else(|e| panic!("query-status on proxy {}: {e}", self.name))
    }

    fn proxy_migration(&self) -> Value {
        qmp(&self.ctl, "query-migrate", json!({}))
            .unwrap_or_else(|e| panic!("query-migrate on proxy {}: {e}", self.name))
    }

    fn kill_qemu(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            signal(q.pid(), libc::SIGKILL);
            q.wait_or_kill(Duration::from_secs(10));
        }
    }

    fn kill_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            signal(p.pid(), libc::SIGKILL);
            p.wait_or_kill(Duration::from_secs(10));
        }
    }

    /// Everything this side ran, for a failure message.
    fn logs(&self) -> String {
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
struct Rig {
    sides: Vec<Side>,
    net: TwoHosts,
    key: PathBuf,
    dir: tempfile::TempDir,
    t0: Instant,
    /// row-migrate's stderr files, for the failure dump.
    driver_logs: Vec<PathBuf>,
}

/// A `row-migrate` run.
struct Driver {
    proc: Proc,
    started: Instant,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// A finished `row-migrate` run.
struct DriverResult {
    success: bool,
    /// The exit code (None when killed by a signal).
    code: Option<i32>,
    stdout: String,
    stderr: String,
    seconds: f64,
}

impl Driver {
    fn wait(mut self, timeout: Duration) -> DriverResult {
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

    fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Rig {
    /// Namespaces, a key, the source image with data, the source proxy and QEMU on A (its
    /// guest writes for `seconds`), and on B the destination proxy as `dst_role` and QEMU with
    /// `-incoming defer`. Returns once the guest reports its first writes.
    fn start(dst_role: Role, seconds: u32) -> Self {
        let t0 = Instant::now();
        let net = TwoHosts::create(None);
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "qemu-migrate-test-key-0123456789abcdef");
        let mut a = Side::new(HostId::A, &net.a, dir.path(), "a1");
        let mut b = Side::new(HostId::B, &net.b, dir.path(), "b1");
        sparse_file(&a.image, DISK_SIZE);
        sparse_file(&b.image, DISK_SIZE);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&a.image).unwrap();
            f.write_all_at(&random_bytes(0x5eed, DATA_LEN as usize), DATA_OFFSET).unwrap();
        }
        a.start_proxy(Role::Source, &key);
        b.start_proxy(dst_role, &key);
        let mut rig = Self { sides: Vec::new(), net, key, dir, t0, driver_logs: Vec::new() };
        rig.sides.push(a);
        rig.sides.push(b);
        eprintln!("[{:5.1}s] proxies up", rig.secs());
        rig.a().start_qemu(seconds, false);
        rig.b().start_qemu(seconds, true);
        eprintln!("[{:5.1}s] qemus started", rig.secs());
        rig.a().wait_console("WORKLOAD-START", Duration::from_secs(120));
        eprintln!("[{:5.1}s] guest booted and writing on A", rig.secs());
        rig
    }

    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// The newest incarnation of host A.
    fn a(&mut self) -> &mut Side {
        self.sides.iter_mut().rev().find(|s| s.host == HostId::A).unwrap()
    }

    fn b(&mut self) -> &mut Side {
        self.sides.iter_mut().rev().find(|s| s.host == HostId::B).unwrap()
    }

    fn side(&mut self, host: HostId) -> &mut Side {
        match host {
            HostId::A => self.a(),
            HostId::B => self.b(),
        }
    }

    /// Starts a new incarnation of `host` (fresh empty image): proxy as `role`, QEMU with
    /// `-incoming defer`.
    fn new_side(&mut self, host: HostId, role: Role, seconds: u32) {
        let n = self.sides.iter().filter(|s| s.host == host).count() + 1;
        let (ns, prefix) = match host {
            HostId::A => (self.net.a.clone(), "a"),
            HostId::B => (self.net.b.clone(), "b"),
        };
        let mut side = Side::new(host, &ns, self.dir.path(), &format!("{prefix}{n}"));
        sparse_file(&side.image, DISK_SIZE);
        side.start_proxy(role, &self.key);
        side.start_qemu(seconds, true);
        self.sides.push(side);
    }

    /// Starts `row-migrate --json` from `from`'s newest side to `to`'s.
    fn spawn_driver(&mut self, from: HostId, to: HostId, strategy: &str, extra: &[&str]) -> Driver {
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
            .args(extra)
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
    fn migrate_ok(&mut self, from: HostId, to: HostId, strategy: &str, extra: &[&str]) -> Value {
        let driver = self.spawn_driver(from, to, strategy, extra);
        let res = driver.wait(Duration::from_secs(180));
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

// ---------------------------------------------------------------------------------------------
// Checks

/// The report of a successful migration (`verified`: run with `--verify-disk`).
fn check_report(report: &Value, strategy: &str, disk_rounds: Option<usize>, verified: bool) {
    assert_eq!(report["strategy"], strategy, "{report}");
    assert!(report["downtime-ms"].as_f64().unwrap_or(0.0) > 0.0, "downtime-ms: {report}");
    assert!(report["memory-bytes"].as_u64().unwrap_or(0) > 0, "memory-bytes: {report}");
    assert!(report["total-seconds"].as_f64().unwrap_or(0.0) > 0.0, "total-seconds: {report}");
    if verified {
        let sha = report["disk-verified"]["sha256"].as_str().unwrap_or_default();
        assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()), "disk-verified: {report}");
    } else {
        assert!(report["disk-verified"].is_null(), "disk-verified without --verify-disk: {report}");
    }
    let disk = &report["disk"];
    assert!(disk["total-wire-bytes"].as_u64().is_some(), "disk total-wire-bytes: {report}");
    if let Some(n) = disk_rounds {
        let rounds = disk["rounds"].as_array().unwrap_or_else(|| panic!("no disk rounds: {report}"));
        // Row may add settle passes before the final round when the final round would be big.
        if strategy == "row" {
            assert!(rounds.len() >= n, "disk rounds: {report}");
        } else {
            assert_eq!(rounds.len(), n, "disk rounds: {report}");
        }
        assert_eq!(rounds.last().unwrap()["kind"], "final", "disk rounds: {report}");
        // Round 1 carries at least the source's data.
        assert!(rounds[0]["logical-bytes"].as_u64().unwrap_or(0) >= DATA_LEN, "round 1: {report}");
    } else {
        assert!(disk["total-wire-bytes"].as_u64().unwrap() >= DATA_LEN, "the mirror carried too little: {report}");
    }
}

/// The proxies after a migration from `s` to `d`: `d` serves directly and waits for nothing;
/// `s` refuses writes (`refuses_writes`: row and bitmap; QEMU's mirror leaves the source alone).
fn check_proxies_after(s: &Side, d: &Side, refuses_writes: bool) {
    let status = d.proxy_status();
    assert_eq!(status["mode"], "direct", "destination proxy: {status}");
    assert_eq!(status["incoming"], false, "destination proxy: {status}");
    if refuses_writes {
        let mut c = RawClient::connect(&s.nbd, EXPORT, true).unwrap();
        let reply = c.call(request(Cmd::Write, 1, 0, 4096), &[7; 4096]).unwrap();
        assert_eq!(reply.error, NBD_EPERM, "the source proxy {} accepted a write after the migration", s.name);
        let st = s.proxy_status();
        assert!(st["writes-refused"].is_string() || st["writes-refused"] == true, "source proxy: {st}");
    }
}

/// After a successful migration from `rig.sides[src]` to `rig.sides[dst]`: the proxies as
/// [`check_proxies_after`] wants them, the guest runs on `dst` only, keeps writing there and
/// verifies every block there, and the data outside its area arrived.
fn check_landed(rig: &mut Rig, src: usize, dst: usize, refuses_writes: bool) {
    let t0 = rig.t0;
    let landed = rig.secs();
    assert_ne!(src, dst);
    let (low, high) = rig.sides.split_at_mut(src.max(dst));
    let (s, d) = if src < dst { (&mut low[src], &mut high[0]) } else { (&mut high[0], &mut low[dst]) };

    check_proxies_after(s, d, refuses_writes);
    let src_state = s.qemu_status();
    assert!(src_state.as_deref() != Some("running"), "the source guest still runs: {src_state:?}");
    assert_eq!(d.qemu_status().as_deref(), Some("running"), "the destination guest does not run");

    let text = d.wait_console("WORKLOAD-VERIFY-", Duration::from_secs(180));
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on {}; console:\n{text}", d.name);
    assert!(text.contains("WORKLOAD written="), "the guest did not write on {} after landing:\n{text}", d.name);
    let before = s.console_text();
    assert!(!before.contains("WORKLOAD-WRITES-DONE"), "the guest finished writing before it moved:\n{before}");
    // Cold data moved with the disk.
    use std::os::unix::fs::FileExt;
    let (mut x, mut y) = (vec![0u8; DATA_LEN as usize], vec![0u8; DATA_LEN as usize]);
    std::fs::File::open(&s.image).unwrap().read_exact_at(&mut x, DATA_OFFSET).unwrap();
    std::fs::File::open(&d.image).unwrap().read_exact_at(&mut y, DATA_OFFSET).unwrap();
    assert!(x == y, "the data outside the guest's area differs between {} and {}", s.name, d.name);
    let line = text.lines().find(|l| l.starts_with("WORKLOAD-VERIFY-OK")).unwrap_or_default();
    let now = t0.elapsed().as_secs_f64();
    eprintln!(
        "[{now:5.1}s] {} -> {}: the guest verified on {} {:.1} s after landing: {line}",
        s.name,
        d.name,
        d.name,
        now - landed
    );
}

/// Where the newest incarnation of `host` is in `rig.sides`.
fn index(rig: &Rig, host: HostId) -> usize {
    rig.sides.iter().rposition(|s| s.host == host).unwrap()
}

/// One successful A -> B migration with `--verify-disk`.
fn migrate_once(strategy: &str, dst_role: Role, rounds: Option<usize>) -> Value {
    let _serial = serial();
    let mut rig = Rig::start(dst_role, MIGRATE_SECONDS);
    std::thread::sleep(Duration::from_secs(2));
    let report = rig.migrate_ok(HostId::A, HostId::B, strategy, &["--verify-disk"]);
    check_report(&report, strategy, rounds, true);
    let (a, b) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_landed(&mut rig, a, b, dst_role == Role::Receive);
    eprintln!("[{:5.1}s] {strategy}: done", rig.secs());
    println!("REPORT {strategy}: {report}");
    report
}

// ---------------------------------------------------------------------------------------------
// Successful migrations

#[test]
fn row_strategy_moves_a_writing_guest_and_its_disk() {
    migrate_once("row", Role::Receive, Some(3));
}

#[test]
fn bitmap_strategy_moves_a_writing_guest_and_its_disk() {
    migrate_once("bitmap", Role::Receive, Some(4));
}

#[test]
fn qemu_mirror_strategy_moves_a_writing_guest_and_its_disk() {
    migrate_once("qemu-mirror", Role::MirrorTarget, None);
}

#[test]
fn guest_migrates_to_b_and_back_to_a() {
    let _serial = serial();
    let seconds = BACK_AND_FORTH_SECONDS;
    let mut rig = Rig::start(Role::Receive, seconds);
    std::thread::sleep(Duration::from_secs(2));
    // The first leg is case 1 without `--verify-disk` (its digests cost seconds of downtime in
    // a debug build); the way back verifies.
    let first = rig.migrate_ok(HostId::A, HostId::B, "row", &[]);
    check_report(&first, "row", Some(3), false);
    let (a1, b1) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_proxies_after(&rig.sides[a1], &rig.sides[b1], true);
    // Host A again, from scratch: the old source goes away, a new receiver and QEMU take over.
    rig.sides[a1].kill_qemu();
    rig.sides[a1].kill_proxy();
    rig.new_side(HostId::A, Role::Receive, seconds);
    rig.b().wait_console("WORKLOAD written=", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let back = rig.migrate_ok(HostId::B, HostId::A, "row", &["--verify-disk"]);
    check_report(&back, "row", Some(3), true);
    let (b, a2) = (index(&rig, HostId::B), index(&rig, HostId::A));
    assert_eq!(a2, 2);
    check_landed(&mut rig, b, a2, true);
}

// ---------------------------------------------------------------------------------------------
// Rollbacks

/// Runs a row migration from A to B that `inject` makes fail, then checks the rollback:
/// row-migrate exits non-zero with one line naming `keyword`, the guest keeps running on A
/// and verifies there, A's proxy goes back to direct mode, B's QEMU never resumed.
fn rollback_case(what: &str, seconds: u32, extra: &[&str], keyword: &str, inject: impl FnOnce(&mut Rig, &Driver)) {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, seconds);
    std::thread::sleep(Duration::from_secs(1));
    let driver = rig.spawn_driver(HostId::A, HostId::B, "row", extra);
    inject(&mut rig, &driver);
    let res = driver.wait(Duration::from_secs(90));
    eprintln!(
        "[{:5.1}s] {what}: row-migrate exited after {:.1} s; stderr:\n{}",
        rig.secs(),
        res.seconds,
        res.stderr.trim_end()
    );
    assert!(!res.success, "row-migrate succeeded despite {what}; stdout:\n{}", res.stdout);
    // Exit code 3: rolled back, the guest runs on the source; --json says so, with each
    // component's state.
    assert_eq!(res.code, Some(3), "row-migrate's exit code after {what}; stderr:\n{}", res.stderr);
    let report: Value = serde_json::from_str(res.stdout.trim())
        .unwrap_or_else(|e| panic!("row-migrate --json printed no JSON failure report ({e}): {}", res.stdout));
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["exit-code"], 3, "{report}");
    assert_eq!(report["state"]["source-qemu"]["status"], "running", "{report}");
    assert!(report["state"]["source-proxy"]["writes-refused"].is_null(), "{report}");
    let errors: Vec<&str> =
        res.stderr.lines().filter(|l| l.starts_with("row-migrate: ") && *l != "row-migrate: rolling back").collect();
    assert_eq!(errors.len(), 1, "want exactly one error line on stderr:\n{}", res.stderr);
    let line = errors[0];
    assert!(line.contains(keyword), "the error line does not say {keyword:?}: {line}");
    assert!(line.contains("rolled back"), "the error line does not say it rolled back: {line}");
    assert!(res.stderr.contains("row-migrate: rolling back"), "stderr:\n{}", res.stderr);

    // The guest runs on A; A's proxy leaves ROW and serves directly again.
    let a = rig.a();
    assert_eq!(a.qemu_status().as_deref(), Some("running"), "the source guest does not run after the rollback");
    let mode = wait_until("the source proxy back in direct mode", Duration::from_secs(30), || {
        let s = a.proxy_status();
        (s["mode"] == "direct").then_some(s)
    });
    assert!(mode["writes-refused"].is_null() || mode["writes-refused"] == false, "source proxy: {mode}");
    let phase = a.proxy_migration();
    assert!(
        matches!(phase["phase"].as_str(), Some("failed" | "cancelled" | "idle")),
        "the source proxy's migration should be over: {phase}"
    );
    // B's guest never resumed.
    let b = rig.b();
    let b_state = b.qemu_status();
    assert!(b_state.as_deref() != Some("running"), "the destination guest runs: {b_state:?}");
    let b_console = b.console_text();
    assert!(!b_console.contains("WORKLOAD"), "the guest printed on B:\n{b_console}");

    // No write lost: the guest keeps writing on A, then reads everything back there.
    let a = rig.a();
    let before = a.console_text();
    assert!(
        !before.contains("WORKLOAD-WRITES-DONE"),
        "the guest finished writing before the rollback was checked:\n{before}"
    );
    let text = a.wait_console("WORKLOAD-VERIFY-", Duration::from_secs(120));
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on A after {what}; console:\n{text}");
    let b_state = rig.b().qemu_status();
    assert!(b_state.as_deref() != Some("running"), "the destination guest runs: {b_state:?}");
    let line = text.lines().find(|l| l.starts_with("WORKLOAD-VERIFY-OK")).unwrap_or_default().to_string();
    eprintln!("[{:5.1}s] {what}: rolled back, guest verified on A: {line}", rig.secs());
}

/// Waits until the source proxy's disk pre-copy has been running for `after` (round 1 started).
fn wait_precopy(rig: &mut Rig, after: Duration) {
    let a = rig.a();
    wait_until("the disk pre-copy", Duration::from_secs(30), || {
        let m = a.proxy_migration();
        (m["phase"] == "precopy" && m["round"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    std::thread::sleep(after);
    let m = rig.a().proxy_migration();
    assert_eq!(m["phase"], "precopy", "the pre-copy should still run: {m}");
    eprintln!("[{:5.1}s] in pre-copy: round {} ({} blocks left)", rig.secs(), m["round"], m["round-remaining-blocks"]);
}

#[test]
fn rollback_when_the_destination_proxy_dies_during_precopy() {
    rollback_case(
        "the destination proxy killed",
        ROLLBACK_SECONDS,
        &["--max-bandwidth", "4M"],
        "disk migration failed",
        |rig, _| {
            wait_precopy(rig, Duration::from_secs(2));
            rig.b().kill_proxy();
        },
    );
}

#[test]
fn rollback_on_ctrl_c_during_precopy() {
    rollback_case("Ctrl-C", ROLLBACK_SECONDS, &["--max-bandwidth", "4M"], "interrupted", |rig, driver| {
        wait_precopy(rig, Duration::from_secs(2));
        signal(driver.pid(), libc::SIGINT);
    });
}

#[test]
fn rollback_on_timeout() {
    rollback_case(
        "--timeout 3s",
        ROLLBACK_SECONDS,
        &["--max-bandwidth", "2M", "--timeout", "3s"],
        "did not finish within 3s",
        |rig, _| {
            wait_precopy(rig, Duration::from_millis(500));
        },
    );
}

/// Nothing in the disk stream notices a dead link by itself (TCP retransmits for ~15 minutes),
/// so it is `--timeout` that ends the migration; the rollback must work with the link down.
#[test]
fn rollback_when_the_network_drops_during_precopy() {
    rollback_case(
        "the network dropped",
        NETWORK_DROP_SECONDS,
        &["--max-bandwidth", "4M", "--timeout", "6s"],
        "did not finish within 6s",
        |rig, _| {
            wait_precopy(rig, Duration::from_secs(2));
            let (ns, dev) = (rig.net.b.clone(), rig.net.veth_b.clone());
            ip(&["-n", &ns, "link", "set", &dev, "down"]);
            eprintln!("[{:5.1}s] link {dev} in {ns} down", rig.secs());
        },
    );
}

#[test]
fn rollback_when_the_destination_qemu_dies_during_the_memory_migration() {
    rollback_case(
        "the destination QEMU killed",
        ROLLBACK_SECONDS,
        &["--max-bandwidth", "8M"],
        "memory migration failed",
        |rig, _| {
            let a = rig.a();
            let mon = a.mon.clone();
            let info = wait_until("the memory migration", Duration::from_secs(60), || {
                let m = qmp(&mon, "query-migrate", json!({})).ok()?;
                (m["status"] == "active" && m["ram"]["transferred"].as_u64().unwrap_or(0) > 0).then_some(m)
            });
            let phase = rig.a().proxy_migration();
            assert_eq!(phase["phase"], "ready", "the disk should wait at ready while memory moves: {phase}");
            rig.b().kill_qemu();
            eprintln!("[{:5.1}s] killed the destination QEMU during the memory migration: {}", rig.secs(), info["ram"]);
        },
    );
}
