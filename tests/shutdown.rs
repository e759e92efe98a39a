//! Stopping the proxy as systemd does (SIGTERM, `nbd-row-proxy@.service`): requests in flight
//! are answered, the ROW overlay and its map are on disk, the sockets are gone, the exit status
//! is 0, and `sd_notify` told the manager READY=1 and STOPPING=1.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use nbd_proto::{Command as Cmd, Request};
// The proxy's drain limit; the unit's TimeoutStopSec is checked against it in tests/packaging.rs.
use nbd_row_proxy::server::DRAIN_TIMEOUT;
use serde_json::json;

/// What the proxy logs when its drain ran into [`DRAIN_TIMEOUT`].
const DRAIN_CUT: &str = "connections still busy after";

/// A proxy with a control socket, started as systemd would start it: `NOTIFY_SOCKET` set.
struct Notified {
    proc: Proc,
    socket: PathBuf,
    control: PathBuf,
    notify: UnixDatagram,
}

impl Notified {
    fn start(dir: &Path, image: &Path, tag: &str) -> Self {
        let (socket, control, notify_path) =
            (dir.join(format!("{tag}.sock")), dir.join(format!("{tag}.ctl")), dir.join(format!("{tag}.notify")));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut cmd = Command::new(bin("nbd-row-proxy"));
        cmd.args(["serve", "--image"]).arg(image).arg("--socket").arg(&socket).arg("--control").arg(&control);
        cmd.env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(image));
        cmd.env("NOTIFY_SOCKET", &notify_path).env("RUST_LOG", "info");
        let proc = Proc::spawn("nbd-row-proxy", &mut cmd, &dir.join(format!("{tag}.log")));
        let mut n = Self { proc, socket, control, notify };
        assert_eq!(n.next_state(), "READY=1", "{}", n.proc.log_text());
        // READY means bound: no polling for the socket.
        assert!(std::os::unix::net::UnixStream::connect(&n.socket).is_ok());
        n
    }

    /// The next sd_notify message: waits while the proxy runs (a start may replay a journal,
    /// a stop flushes), up to [`HANG_LIMIT`].
    fn next_state(&mut self) -> String {
        let mut buf = [0u8; 256];
        let start = Instant::now();
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    let gone = self.proc.child.try_wait().unwrap();
                    assert!(
                        gone.is_none(),
                        "no sd_notify message: the proxy exited ({gone:?})\n{}",
                        self.proc.log_text()
                    );
                    assert!(start.elapsed() < HANG_LIMIT, "no sd_notify message within {HANG_LIMIT:?}");
                }
                Err(e) => panic!("no sd_notify message: {e}"),
            }
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGTERM, then checks the clean stop: STOPPING=1, exit 0 with the drain over before its
    /// limit (no client held it), no socket left behind. The flush after the drain is disk
    /// work: only a hang fails it.
    fn stop_cleanly(&mut self) -> Duration {
        let start = Instant::now();
        let status = self.proc.terminate(DRAIN_TIMEOUT + HANG_LIMIT);
        let took = start.elapsed();
        let log = self.proc.log_text();
        assert!(status.success(), "exit status {status} after SIGTERM\n{log}");
        assert!(!log.contains(DRAIN_CUT), "the drain ran into its {DRAIN_TIMEOUT:?} limit ({took:?} in all)\n{log}");
        assert_eq!(self.next_state(), "STOPPING=1");
        assert!(log.contains("stopped cleanly"), "{log}");
        for s in [&self.socket, &self.control] {
            assert!(!s.exists(), "{} left behind\n{log}", s.display());
        }
        took
    }
}

fn request(command: Cmd, cookie: u64, offset: u64, length: u32) -> Request {
    Request { flags: 0, command, cookie, offset, length }
}

/// A write whose payload is half-sent when SIGTERM arrives is still received, written and
/// answered; the connection then closes, the proxy exits 0, and a restarted proxy serves the
/// write from the ROW overlay (its map was synced).
#[test]
fn sigterm_answers_the_request_in_flight_and_syncs_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 16 << 20);
    let mut p = Notified::start(dir.path(), &image, "a");
    ControlClient::connect(&p.control).ok("row-start", json!({}));

    let mut c = RawClient::connect(&p.socket, "", false).unwrap();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut header = Vec::new();
    request(Cmd::Write, 7, 1 << 20, data.len() as u32).encode(&mut header);
    c.send_raw(&header).unwrap();
    c.send_raw(&data[..data.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    signal(p.proc.pid(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(p.proc.child.try_wait().unwrap().is_none(), "the proxy left with a request in flight");
    c.send_raw(&data[data.len() / 2..]).unwrap();
    let reply = c.recv().unwrap();
    assert_eq!((reply.cookie, reply.error), (7, 0), "the write in flight must be answered");
    // No new request is taken: the proxy closes the connection.
    assert!(c.recv().is_err(), "the connection should close after the drain");
    p.stop_cleanly();
    // The write went to the overlay, not the frozen base.
    let base = std::fs::read(&image).unwrap();
    assert!(base[1 << 20..5 << 20].iter().all(|&b| b == 0), "ROW is on: the base must not change");

    let q = Notified::start(dir.path(), &image, "b");
    let mut c = RawClient::connect(&q.socket, "", false).unwrap();
    let back = c.call(request(Cmd::Read, 8, 1 << 20, data.len() as u32), &[]).unwrap();
    assert_eq!(back.error, 0);
    assert!(back.data == data, "the restarted proxy must serve the acknowledged write");
}

/// SIGTERM while qemu-io writes: every write qemu-io saw acknowledged is in the image (read
/// back through a restarted proxy); the stop does not wait the whole drain time for a client
/// that is connected but idle.
#[test]
fn sigterm_during_qemu_io_writes_keeps_every_acknowledged_write() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 64 << 20);
    let mut p = Notified::start(dir.path(), &image, "a");

    // 60 writes of 1 MiB with 40 ms pauses: at least 2.4 s of I/O, stopped once the fifth write
    // is in the image (its progress, however slow the machine).
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &p.uri()]);
    for i in 0..60u64 {
        cmd.args(["-c", &format!("write -P {} {i}M 1M", 0x10 + i), "-c", "sleep 40"]);
    }
    let mut client = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let fifth = std::fs::File::open(&image).unwrap();
    e2e::rig::wait_until("qemu-io's fifth write", HANG_LIMIT, || {
        use std::os::unix::fs::FileExt;
        let mut block = [0u8; 4096];
        fifth.read_exact_at(&mut block, (4 << 20) + (1 << 20) - 4096).unwrap();
        if block.iter().all(|&b| b == 0x14) {
            return Some(());
        }
        assert!(client.try_wait().unwrap().is_none(), "qemu-io exited before its fifth write");
        None
    });
    // The idle client (between its writes) does not hold the stop: stop_cleanly checks that the
    // drain ended before its limit.
    let took = p.stop_cleanly();
    eprintln!("stopped in {took:?} with qemu-io connected");
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let acked: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("wrote 1048576/1048576 bytes at offset "))
        .map(|o| o.trim().parse::<u64>().unwrap() >> 20)
        .collect();
    assert!(acked.len() >= 5 && acked.len() < 60, "SIGTERM should land mid-run: {} writes acked\n{text}", acked.len());

    let q = Notified::start(dir.path(), &image, "b");
    let mut check = Command::new("qemu-io");
    check.args(["-f", "raw", "-r", &q.uri()]);
    for i in &acked {
        check.args(["-c", &format!("read -P {} {i}M 1M", 0x10 + i)]);
    }
    let out = run_ok(&mut check);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert_eq!(text.matches("read 1048576/1048576").count(), acked.len(), "{text}");
}
