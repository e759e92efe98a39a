//! Helpers for end-to-end tests: locating the binaries, starting and stopping server processes
//! by pid, running real client tools, and a small synchronous NBD client built on `nbd-proto`
//! for the cases real clients refuse to produce (bad magic, pipelined floods).

pub mod rig;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nbd_proto::consts::*;
use nbd_proto::option::{InfoRequest, MetaContextRequest};
use nbd_proto::transmission::ChunkHeader;
use nbd_proto::{Chunk, ClientFlags, ClientOption, Greeting, OptionReply, OptionReplyKind, ReplyHeader, Request};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Path of a binary built from this workspace (`NBD_ROW_PROXY_BIN` overrides the proxy's).
pub fn bin(name: &str) -> PathBuf {
    if name == "nbd-row-proxy" {
        if let Ok(p) = std::env::var("NBD_ROW_PROXY_BIN") {
            return p.into();
        }
    }
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(path.exists(), "{} not built: run `cargo build --workspace` first", path.display());
    path
}

/// Fails the test with a clear message when an external tool is missing.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is not installed: run scripts/setup");
}

/// Runs a command to completion; panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A throwaway CA with server and client certificates (`nbd-row-proxy tls-certs`) in `dir`, for
/// the test hosts' addresses and loopback; returns `dir`.
pub fn lab_pki(dir: &Path) -> PathBuf {
    run_ok(Command::new(bin("nbd-row-proxy")).args(["tls-certs", "--dir"]).arg(dir).args([
        "--host",
        ADDR_A,
        "--host",
        ADDR_B,
        "--host",
        "127.0.0.1",
        "--host",
        "localhost",
    ]));
    dir.to_path_buf()
}

/// The ceiling on a wait for work whose duration depends on the machine's disk or CPU (a flush
/// or sync, a merge, a migration round, a guest booting under TCG, a process starting or
/// stopping, a control command that does I/O). It only catches hangs: the tests run on small,
/// shared machines where an fsync after 200,000 scattered writes has taken a minute, and no
/// such wait may fail because the machine is slow.
pub const HANG_LIMIT: Duration = Duration::from_secs(600);

/// A hang-catching ceiling for work that moves `bytes` through the disk: [`HANG_LIMIT`] plus
/// the bytes at a pessimistic 5 MB/s, for work larger than a few hundred megabytes.
pub fn hang_limit(bytes: u64) -> Duration {
    HANG_LIMIT + Duration::from_secs(bytes / 5_000_000)
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < timeout, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A field of `/proc/PID/status` (e.g. `VmRSS` in KiB, `Threads`), as a number.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).unwrap();
    value.trim().trim_end_matches(" kB").trim().parse().unwrap()
}

/// A process's resident memory in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}

/// A process's thread count.
pub fn threads(pid: u32) -> u64 {
    proc_status(pid, "Threads")
}

/// Sends a signal to a process by pid.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Self {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { child, name: name.to_string(), log: log.to_path_buf() }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status (SIGKILL after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        self.wait_or_kill(timeout)
    }

    /// Waits until the process accepts connections on the Unix socket `path` (a stale socket
    /// file left by a killed process does not count); panics with its log when it exits first,
    /// or after [`HANG_LIMIT`] (a start may replay a journal or resume a merge, and QEMU under
    /// TCG starts slowly).
    pub fn wait_for_socket(&mut self, path: &Path) {
        let start = Instant::now();
        while UnixStream::connect(path).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited with {status} before {} took connections; log:\n{}",
                    self.name,
                    path.display(),
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < HANG_LIMIT,
                "{} did not accept connections within {HANG_LIMIT:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit, killing the process after `timeout`.
    pub fn wait_or_kill(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate(Duration::from_secs(5));
        }
    }
}

/// The state directory the test rig gives the proxy of `image`: `state/` beside it, so a
/// restarted proxy finds its disk's state again and the test's directory holds everything.
pub fn state_dir_of(image: &Path) -> PathBuf {
    image.parent().unwrap_or(Path::new(".")).join("state")
}

/// The state entry (overlay, journal, ownership record, residual) of the disk at `image`
/// served by the rig: found by the disk id on the image's extended attribute.
pub fn state_entry_of(image: &Path) -> PathBuf {
    let id = xattr::get(image, "user.nbd-row-proxy.disk-id")
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{} has no disk id: was it ever served?", image.display()));
    state_dir_of(image).join(String::from_utf8(id).unwrap())
}

/// An `nbd-row-proxy serve` process on a Unix socket in a temporary directory.
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// Its socket.
    pub socket: PathBuf,
}

impl Server {
    /// Starts `nbd-row-proxy serve --image IMAGE --socket DIR/nbd.sock EXTRA...`.
    pub fn start(dir: &Path, image: &Path, extra: &[&str]) -> Self {
        Self::start_with(dir, "serve", image, extra)
    }

    /// Like [`Server::start`] with another subcommand (`receive`).
    pub fn start_with(dir: &Path, subcommand: &str, image: &Path, extra: &[&str]) -> Self {
        let socket = dir.join("nbd.sock");
        let mut cmd = Command::new(bin("nbd-row-proxy"));
        cmd.arg(subcommand).arg("--image").arg(image).arg("--socket").arg(&socket).args(extra);
        // Each test's disks keep their state beside them (a --state-dir in `extra` wins).
        cmd.env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(image));
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let mut proc = Proc::spawn("nbd-row-proxy", &mut cmd, &dir.join("server.log"));
        proc.wait_for_socket(&socket);
        Self { proc, socket }
    }

    /// The NBD URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The NBD URI of a named export.
    pub fn uri_of(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

/// A minimal blocking NBD client for protocol-level tests.
pub struct RawClient {
    sock: UnixStream,
    buf: Vec<u8>,
    /// Export size from negotiation.
    pub size: u64,
    /// Transmission flags from negotiation.
    pub flags: u16,
    /// Whether structured replies are on.
    pub structured: bool,
}

/// A reply as the raw client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReply {
    /// The request's cookie.
    pub cookie: u64,
    /// Error value, 0 on success.
    pub error: u32,
    /// Data of a successful read (holes filled with zeroes), if any.
    pub data: Vec<u8>,
    /// Block status extents, if any.
    pub extents: Vec<(u32, u32)>,
}

impl RawClient {
    /// Connects and negotiates: fixed newstyle, structured replies and `base:allocation`
    /// when `structured`, then `NBD_OPT_GO` for `export` with block sizes requested. Replies
    /// are awaited for up to [`HANG_LIMIT`] (a flush may take minutes on a slow disk).
    pub fn connect(socket: &Path, export: &str, structured: bool) -> std::io::Result<Self> {
        let sock = UnixStream::connect(socket)?;
        sock.set_read_timeout(Some(HANG_LIMIT))?;
        let mut c = Self { sock, buf: Vec::new(), size: 0, flags: 0, structured };
        let greeting: Greeting = c.read_frame(Greeting::decode)?;
        assert_eq!(greeting.handshake_flags & NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_FIXED_NEWSTYLE);
        let mut out = Vec::new();
        ClientFlags { bits: NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES }.encode(&mut out);
        if structured {
            ClientOption::StructuredReply.encode(&mut out);
            ClientOption::SetMetaContext(MetaContextRequest {
                export: export.into(),
                queries: vec![BASE_ALLOCATION.into()],
            })
            .encode(&mut out);
        }
        ClientOption::Go(InfoRequest { export: export.into(), requests: vec![NBD_INFO_BLOCK_SIZE] }).encode(&mut out);
        c.sock.write_all(&out)?;
        let mut acks = 0;
        let want = if structured { 3 } else { 1 };
        while acks < want {
            let reply = c.option_reply()?;
            match reply.kind {
                OptionReplyKind::Ack => acks += 1,
                OptionReplyKind::Info(nbd_proto::InfoReply::Export { size, transmission_flags }) => {
                    c.size = size;
                    c.flags = transmission_flags;
                }
                OptionReplyKind::Error { code, message } => {
                    return Err(std::io::Error::other(format!("option {} refused: {code:#x} {message}", reply.option)))
                }
                _ => {}
            }
        }
        Ok(c)
    }

    /// Sets how long a reply is awaited, for work larger than [`HANG_LIMIT`] covers (see
    /// [`hang_limit`]).
    pub fn set_read_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(timeout))
    }

    /// Reads one option reply.
    pub fn option_reply(&mut self) -> std::io::Result<OptionReply> {
        self.read_frame(OptionReply::decode)
    }

    /// Writes raw bytes to the socket.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sock.write_all(bytes)
    }

    /// Sends a request (and payload) without waiting for the reply.
    pub fn send(&mut self, req: Request, payload: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(28 + payload.len());
        req.encode(&mut out);
        out.extend_from_slice(payload);
        self.sock.write_all(&out)
    }

    /// Reads the next complete reply (all chunks of a structured one).
    pub fn recv(&mut self) -> std::io::Result<RawReply> {
        let header: ReplyHeader = self.read_frame(ReplyHeader::decode)?;
        match header {
            ReplyHeader::Simple { error, cookie } => {
                Ok(RawReply { cookie, error, data: Vec::new(), extents: Vec::new() })
            }
            ReplyHeader::Structured(first) => {
                let mut reply = RawReply { cookie: first.cookie, error: 0, data: Vec::new(), extents: Vec::new() };
                let mut h: ChunkHeader = first;
                let mut pieces = Vec::new();
                loop {
                    let payload = self.read_exact(h.length as usize)?;
                    match Chunk::parse(&h, &payload).map_err(std::io::Error::other)? {
                        Chunk::OffsetData { offset, data } => pieces.push((offset, data)),
                        Chunk::OffsetHole { offset, hole_size } => pieces.push((offset, vec![0; hole_size as usize])),
                        Chunk::BlockStatus { extents, .. } => {
                            reply.extents = extents.iter().map(|e| (e.length, e.flags)).collect()
                        }
                        Chunk::Error { error, .. } => reply.error = error,
                        Chunk::None | Chunk::Unknown { .. } => {}
                    }
                    if h.is_done() {
                        break;
                    }
                    match self.read_frame(ReplyHeader::decode)? {
                        ReplyHeader::Structured(next) if next.cookie == reply.cookie => h = next,
                        other => return Err(std::io::Error::other(format!("interleaved reply {other:?}"))),
                    }
                }
                pieces.sort_by_key(|p| p.0);
                reply.data = pieces.into_iter().flat_map(|p| p.1).collect();
                Ok(reply)
            }
        }
    }

    /// Sends one request and waits for its reply; a simple read reply's data is read too.
    pub fn call(&mut self, req: Request, payload: &[u8]) -> std::io::Result<RawReply> {
        self.send(req, payload)?;
        let mut reply = self.recv()?;
        if !self.structured && req.command == nbd_proto::Command::Read && reply.error == 0 {
            reply.data = self.read_exact(req.length as usize)?;
        }
        Ok(reply)
    }

    fn read_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill()?;
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut tmp = [0u8; 65536];
        let n = self.sock.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    fn read_frame<T>(
        &mut self,
        decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, nbd_proto::ProtocolError>,
    ) -> std::io::Result<T> {
        loop {
            if let Some((v, n)) = decode(&self.buf).map_err(std::io::Error::other)? {
                self.buf.drain(..n);
                return Ok(v);
            }
            self.fill()?;
        }
    }
}

/// The first `size` bytes of a server's default export, read in 4 MiB requests.
pub fn read_disk(server: &Server, size: usize) -> Vec<u8> {
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let mut out = Vec::with_capacity(size);
    for (i, off) in (0..size).step_by(4 << 20).enumerate() {
        let len = (size - off).min(4 << 20);
        let r = c.call(request(nbd_proto::Command::Read, i as u64, off as u64, len as u32), &[]).unwrap();
        assert_eq!(r.error, 0, "read at {off} failed");
        out.extend_from_slice(&r.data);
    }
    out
}

/// A request with no flags.
pub fn request(command: nbd_proto::Command, cookie: u64, offset: u64, length: u32) -> Request {
    Request { flags: 0, command, cookie, offset, length }
}

/// Deterministic pseudo-random bytes (xorshift64*), for test data without a `rand` dependency.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The guest kernel and initramfs built by `scripts/build-guest` (run here; it is cached).
pub fn guest_image() -> (PathBuf, PathBuf) {
    let root = repo_root();
    run_ok(&mut Command::new(root.join("scripts/build-guest")));
    (root.join("target/guest/vmlinuz"), root.join("target/guest/initramfs.cpio.gz"))
}

/// Starts a TCG guest whose virtio disk is `drive_uri` (an NBD URI), running `guest.cmd=CMD`.
/// The serial console goes to `log`.
pub fn start_guest(drive_uri: &str, cmd: &str, log: &Path) -> Proc {
    start_guest_with_args(drive_uri, cmd, &[], log)
}

/// A blocking client for a control socket (the proxy's or QEMU's QMP), for tests.
pub struct ControlClient {
    rt: tokio::runtime::Runtime,
    client: qmp_proto::Client,
}

impl ControlClient {
    /// Connects and negotiates capabilities (waiting up to [`HANG_LIMIT`], as commands do).
    pub fn connect(path: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = rt
            .block_on(qmp_proto::Client::connect(path, HANG_LIMIT))
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
        Self { rt, client }
    }

    /// Runs a command; `Err` carries the error reply's description. The reply is awaited for
    /// up to [`HANG_LIMIT`]: commands such as `row-stop`, `migrate-finish` or `reclaim` merge,
    /// send or sync data.
    pub fn execute(&mut self, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value, String> {
        self.rt.block_on(self.client.execute(command, arguments, HANG_LIMIT)).map_err(|e| e.to_string())
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        self.execute(command, arguments).unwrap_or_else(|e| panic!("{command} failed: {e}"))
    }

    /// Runs control command `C` with typed arguments and reply (the schema of `control_api`).
    pub fn call<C: control_api::Command>(&mut self, args: C::Args) -> Result<C::Reply, String> {
        let arguments = serde_json::to_value(args).map_err(|e| e.to_string())?;
        let reply = self.execute(C::NAME, arguments)?;
        serde_json::from_value(reply)
            .map_err(|e| format!("{} replied something the schema does not know: {e}", C::NAME))
    }

    /// Waits for the next event.
    pub fn next_event(&mut self, timeout: Duration) -> Option<qmp_proto::Event> {
        self.rt.block_on(self.client.next_event(timeout)).unwrap()
    }
}

/// Starts a TCG guest like [`start_guest`], running `guest.cmd=CMD` with `guest.args=ARGS`
/// (joined with commas; the guest's /init splits them back into argv).
pub fn start_guest_with_args(drive_uri: &str, cmd: &str, args: &[&str], log: &Path) -> Proc {
    let mut qemu = guest_command();
    qemu.args(["--drive", drive_uri, "--cmd", cmd]);
    for a in args {
        qemu.args(["--arg", a]);
    }
    Proc::spawn("qemu", &mut qemu, log)
}

/// `scripts/guest`, the one launcher of the test guest (the demo and the benches use it too),
/// with the guest built.
pub fn guest_command() -> Command {
    require_tool("qemu-system-x86_64");
    static BUILT: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    BUILT.get_or_init(guest_image);
    Command::new(repo_root().join("scripts/guest"))
}

/// Waits until the log of `proc` contains `needle` and returns the log; panics (with the log)
/// when `timeout` passes or the process exits first.
pub fn wait_for_log(proc: &mut Proc, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = proc.log_text();
        if text.contains(needle) {
            return text;
        }
        if let Some(status) = proc.child.try_wait().unwrap() {
            let text = proc.log_text();
            if text.contains(needle) {
                return text;
            }
            panic!("{} exited with {status} before printing {needle:?}; log:\n{text}", proc.name);
        }
        assert!(start.elapsed() < timeout, "{} did not print {needle:?} within {timeout:?}; log:\n{text}", proc.name);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The harness shared by the migration tests: two proxies (a `serve` source and a `receive`
/// destination) with control sockets, a writer that keeps writing through NBD while it models
/// the disk, and helpers to wait for phases and read a whole disk back.
pub mod migration {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use nbd_proto::Command as Cmd;
    use serde_json::Value;

    use super::*;

    /// Disk size used by the migration tests.
    pub const SIZE: usize = 32 << 20;
    /// The proxy's block size.
    pub const BS: usize = 4096;

    /// One proxy with its control socket.
    pub struct Host {
        /// The process and its NBD socket.
        pub server: Server,
        /// Its control socket.
        pub control: PathBuf,
        /// Its image.
        pub image: PathBuf,
    }

    impl Host {
        /// A new control connection.
        pub fn ctl(&self) -> ControlClient {
            ControlClient::connect(&self.control)
        }
    }

    /// Writes `DIR/key` with mode 0600.
    pub fn key_file(dir: &Path, content: &str) -> PathBuf {
        let path = dir.join("key");
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// A loopback TCP port that was free a moment ago.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// `nbd-row-proxy serve` of `image` in `dir` with a control socket and a key.
    pub fn source(dir: &Path, image: &Path, key: &Path) -> Host {
        source_with(dir, image, &["--auth-key-file", key.to_str().unwrap()])
    }

    /// `nbd-row-proxy serve` of `image` in `dir` with a control socket and `protection` (its
    /// --auth-key-file, --tls-creds, --insecure arguments).
    pub fn source_with(dir: &Path, image: &Path, protection: &[&str]) -> Host {
        let control = dir.join("control.sock");
        let mut args = vec!["--control", control.to_str().unwrap()];
        args.extend_from_slice(protection);
        let mut server = Server::start(dir, image, &args);
        server.proc.wait_for_socket(&control);
        Host { server, control, image: image.to_path_buf() }
    }

    /// `nbd-row-proxy receive` into `image`, listening on 127.0.0.1:`port`.
    pub fn destination(dir: &Path, image: &Path, key: &Path, port: u16) -> Host {
        destination_with(dir, image, &["--auth-key-file", key.to_str().unwrap()], port)
    }

    /// A source proxy on a fresh image of random data (`seed`) and a destination proxy waiting
    /// for it on an empty sparse image, both with the key `key`; their directories go with it.
    pub struct Pair {
        /// The source.
        pub src: Host,
        /// The destination, listening on 127.0.0.1:`port`.
        pub dst: Host,
        /// The destination's migration port.
        pub port: u16,
        /// The source image's data.
        pub data: Vec<u8>,
        _dirs: [tempfile::TempDir; 2],
    }

    impl Pair {
        /// Starts both proxies.
        pub fn start(seed: u64, key: &str) -> Self {
            let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let key = key_file(src_dir.path(), key);
            let (image, data) = source_image(src_dir.path(), seed);
            let src = source(src_dir.path(), &image, &key);
            let dst_image = dst_dir.path().join("disk.raw");
            super::sparse_file(&dst_image, SIZE as u64);
            let port = free_port();
            let dst = destination(dst_dir.path(), &dst_image, &key, port);
            Self { src, dst, port, data, _dirs: [src_dir, dst_dir] }
        }
    }

    /// Like [`destination`] with `protection` as [`source_with`] takes it.
    pub fn destination_with(dir: &Path, image: &Path, protection: &[&str], port: u16) -> Host {
        let control = dir.join("control.sock");
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["--control", control.to_str().unwrap(), "--listen", &listen];
        args.extend_from_slice(protection);
        let mut server = Server::start_with(dir, "receive", image, &args);
        server.proc.wait_for_socket(&control);
        Host { server, control, image: image.to_path_buf() }
    }

    /// A fresh directory with a source image: random data with a hole in the middle.
    pub fn source_image(dir: &Path, seed: u64) -> (PathBuf, Vec<u8>) {
        let image = dir.join("disk.raw");
        let mut data = random_bytes(seed, SIZE);
        data[8 << 20..12 << 20].fill(0);
        std::fs::write(&image, &data).unwrap();
        // Punch the zero range so the base has a real hole.
        punch_hole(&image, 8 << 20, 4 << 20);
        (image, data)
    }

    /// Deallocates a range of a file.
    pub fn punch_hole(path: &Path, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        // SAFETY: fallocate on a file we own.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        assert_eq!(r, 0, "punching a hole in {}: {}", path.display(), std::io::Error::last_os_error());
    }

    /// A writer that keeps writing through NBD and remembers what the disk must hold.
    pub struct Writer {
        stop: Arc<AtomicBool>,
        done: Arc<AtomicU64>,
        handle: JoinHandle<(Vec<u8>, u64)>,
    }

    /// Hot-set share of writes (percent), and how many hot blocks.
    pub const HOT_SHARE: u64 = 85;
    const HOT_BLOCKS: u64 = 64;

    impl Writer {
        /// Starts writing to `socket` at about `rate` requests per second (0 = flat out): 4 KiB
        /// writes mostly to a small hot set, the rest uniform, some partial blocks, trims and zeroes.
        pub fn start(socket: &Path, model: Vec<u8>, seed: u64, rate: u64) -> Self {
            Self::start_with(socket, model, seed, rate, HOT_SHARE)
        }

        /// Like [`Writer::start`] with `hot_share` percent of the writes to the hot set
        /// (0: uniform over the disk, so nearly every write hits a block not written before).
        pub fn start_with(socket: &Path, model: Vec<u8>, seed: u64, rate: u64, hot_share: u64) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let done = Arc::new(AtomicU64::new(0));
            let counter = done.clone();
            let socket = socket.to_path_buf();
            let handle = std::thread::spawn(move || {
                let mut c = RawClient::connect(&socket, "", true).unwrap();
                let mut model = model;
                let mut x = seed | 1;
                let mut next = move |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % n
                };
                let blocks = (SIZE / BS) as u64;
                let started = Instant::now();
                let mut n = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    if rate > 0 {
                        let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    let block = if next(100) < hot_share { 1000 + next(HOT_BLOCKS) * 7 } else { next(blocks) };
                    let off = block as usize * BS;
                    let r = next(100);
                    let reply = if r < 80 {
                        let data = random_bytes(next(u64::MAX), BS);
                        let reply = c.call(request(Cmd::Write, n, off as u64, BS as u32), &data).unwrap();
                        model[off..off + BS].copy_from_slice(&data);
                        reply
                    } else if r < 90 {
                        let sector = next(7) as usize;
                        let len = 512 * (1 + next(7 - sector as u64) as usize);
                        let data = random_bytes(next(u64::MAX), len);
                        let start = off + sector * 512;
                        let reply = c.call(request(Cmd::Write, n, start as u64, len as u32), &data).unwrap();
                        model[start..start + len].copy_from_slice(&data);
                        reply
                    } else if r < 95 {
                        let len = (2 * BS).min(SIZE - off);
                        let reply = c.call(request(Cmd::WriteZeroes, n, off as u64, len as u32), &[]).unwrap();
                        model[off..off + len].fill(0);
                        reply
                    } else {
                        let reply = c.call(request(Cmd::Trim, n, off as u64, BS as u32), &[]).unwrap();
                        // A trim may leave the old data or zeroes: learn which.
                        let back = c.call(request(Cmd::Read, n, off as u64, BS as u32), &[]).unwrap();
                        model[off..off + BS].copy_from_slice(&back.data);
                        reply
                    };
                    assert_eq!(reply.error, 0, "write {n} failed");
                    n += 1;
                    counter.store(n, Ordering::Relaxed);
                }
                (model, n)
            });
            Self { stop, done, handle }
        }

        /// Waits until the writer has made `n` requests in all: a wait on its progress, not on
        /// the clock, for a machine too busy to keep its rate. Panics if it stopped first, or
        /// after [`HANG_LIMIT`].
        pub fn wait_writes(&self, n: u64) {
            let start = Instant::now();
            while self.done.load(Ordering::Relaxed) < n {
                assert!(
                    !self.handle.is_finished(),
                    "the writer stopped after {} requests",
                    self.done.load(Ordering::Relaxed)
                );
                assert!(
                    start.elapsed() < HANG_LIMIT,
                    "the writer made {} requests in {HANG_LIMIT:?}",
                    self.done.load(Ordering::Relaxed)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        /// Stops (as a VM pausing does) and returns the expected disk and the request count.
        pub fn stop(self) -> (Vec<u8>, u64) {
            self.stop.store(true, Ordering::Relaxed);
            self.handle.join().unwrap()
        }
    }

    /// Polls `query-migrate` until the phase is `want`; panics on `failed` or after `timeout`.
    pub fn wait_phase(ctl: &mut ControlClient, want: &str, timeout: Duration) -> Value {
        use control_api::{NoArgs, Phase, QueryMigrate};
        let start = Instant::now();
        loop {
            let status = ctl.call::<QueryMigrate>(NoArgs {}).expect("query-migrate");
            if status.phase.as_str() == want {
                return serde_json::to_value(status).unwrap();
            }
            assert!(status.phase != Phase::Failed, "migration failed: {status:?}");
            assert!(start.elapsed() < timeout, "phase {want} not reached within {timeout:?}: {status:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The whole disk read through the server's NBD socket.
    pub fn read_all(server: &Server) -> Vec<u8> {
        super::read_disk(server, SIZE)
    }

    /// Migrates with a writer running during the rounds; returns the final status and the
    /// disk as the writer left it.
    pub fn migrate_under_load(
        src: &Host,
        dst_port: u16,
        strategy: &str,
        start_model: Vec<u8>,
        seed: u64,
    ) -> (Value, Vec<u8>) {
        let writer = Writer::start(&src.server.socket, start_model, seed, 1500);
        std::thread::sleep(Duration::from_millis(300));
        let mut ctl = src.ctl();
        let mut args = control_api::MigrateStartArgs::new(
            format!("tcp:127.0.0.1:{dst_port}"),
            strategy.parse().expect("a strategy name"),
        );
        args.max_bandwidth = Some(40 << 20);
        ctl.call::<control_api::MigrateStart>(args).expect("migrate-start");
        wait_phase(&mut ctl, "ready", HANG_LIMIT);
        // Keep writing a little while pre-copy is done, as a VM would until it pauses, and for
        // at least 200 requests in all, however slowly this machine lets the writer go.
        std::thread::sleep(Duration::from_millis(300));
        writer.wait_writes(201);
        let (model, writes) = writer.stop();
        assert!(writes > 200, "the writer should have been busy during the rounds ({writes} writes)");
        let finished =
            ctl.call::<control_api::MigrateFinish>(control_api::MigrateFinishArgs::default()).expect("migrate-finish");
        assert_eq!(finished.phase, control_api::Phase::HandedOver, "{finished:?}");
        (serde_json::to_value(finished).unwrap(), model)
    }
}

/// Two test "hosts": network namespaces A (192.0.2.1) and B (192.0.2.2, TEST-NET-1) joined by
/// a veth pair, optionally rate-limited with tbf (`scripts/two-hosts`); deleted when dropped (deleting a
/// namespace deletes its end of the pair, and the pair with it).
pub struct TwoHosts {
    /// Namespace of host A.
    pub a: String,
    /// Namespace of host B.
    pub b: String,
    /// A's end of the veth pair.
    pub veth_a: String,
    /// B's end of the veth pair.
    pub veth_b: String,
}

/// Host A's address.
pub const ADDR_A: &str = "192.0.2.1";
/// Host B's address.
pub const ADDR_B: &str = "192.0.2.2";

/// Runs `ip ARGS...`, which must succeed.
pub fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

impl TwoHosts {
    /// Creates the pair with `scripts/two-hosts` (the one set-up the demo and the benches use
    /// too); `rate` (e.g. `100mbit`) limits the link in both directions.
    pub fn create(rate: Option<&str>) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        require_tool("ip");
        let tag =
            format!("nrt{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let short = &tag[..tag.len().min(10)];
        let hosts = Self {
            a: format!("{tag}-a"),
            b: format!("{tag}-b"),
            veth_a: format!("{short}-va"),
            veth_b: format!("{short}-vb"),
        };
        let out = Command::new(repo_root().join("scripts/two-hosts"))
            .args(["up", &tag])
            .args(rate)
            .output()
            .expect("cannot run scripts/two-hosts");
        assert!(
            out.status.success(),
            "`scripts/two-hosts up {tag}` failed ({}): these tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        hosts
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
