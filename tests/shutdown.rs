//! Stopping the proxy as systemd does (SIGTERM, `nbd-row-proxy@.service`): requests in flight
//! are answered, the ROW overlay and its map are on disk, the sockets are gone, the exit status
//! is 0, and `sd_notify` told the manager READY=1 and STOPPING=1.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use nbd_proto::{Command as Cmd, Request};
use serde_json::json;

/// The proxy's drain limit (`DRAIN_TIMEOUT` in nbd-row-proxy/src/server.rs) and a margin; the
/// unit's TimeoutStopSec is checked against DRAIN_TIMEOUT in tests/packaging.rs.
const STOP_LIMIT: Duration = Duration::from_secs(35);

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
        notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut cmd = Command::new(bin("nbd-row-proxy"));
        cmd.args(["serve", "--image"]).arg(image).arg("--socket").arg(&socket).arg("--control").arg(&control);
        cmd.env("NOTIFY_SOCKET", &notify_path).env("RUST_LOG", "info");
        let proc = Proc::spawn("nbd-row-proxy", &mut cmd, &dir.join(format!("{tag}.log")));
        let mut n = Self { proc, socket, control, notify };
        assert_eq!(n.next_state(), "READY=1", "{}", n.proc.log_text());
        // READY means bound: no polling for the socket.
        assert!(std::os::unix::net::UnixStream::connect(&n.socket).is_ok());
        n
    }

    fn next_state(&mut self) -> String {
        let mut buf = [0u8; 256];
        let n = self.notify.recv(&mut buf).unwrap_or_else(|e| panic!("no sd_notify message: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGTERM, then checks the clean stop: STOPPING=1, exit 0 within the drain limit, no
    /// socket left behind.
    fn stop_cleanly(&mut self) -> Duration {
        let start = Instant::now();
        let status = self.proc.terminate(STOP_LIMIT);
        let took = start.elapsed();
        let log = self.proc.log_text();
        assert!(status.success(), "exit status {status} after SIGTERM\n{log}");
        assert!(took < STOP_LIMIT, "took {took:?}\n{log}");
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

    // 60 writes of 1 MiB with 40 ms pauses: about 2.5 s of I/O, stopped after 1 s.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &p.uri()]);
    for i in 0..60u64 {
        cmd.args(["-c", &format!("write -P {} {i}M 1M", 0x10 + i), "-c", "sleep 40"]);
    }
    let client = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let took = p.stop_cleanly();
    assert!(took < Duration::from_secs(10), "an idle client held the stop for {took:?}");
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
