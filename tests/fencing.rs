//! One owner of the disk at every instant, checked against the real binaries:
//! - a committed destination keeps its disk through a reset link, a restart, an authenticated
//!   `Discard` and a new session; a restarted `receive` serves it read-write;
//! - a source that handed its disk over keeps refusing writes across a restart, and gets it
//!   back only when the destination agrees (it has not written yet) or by a forced `reclaim`;
//! - typos destroy nothing: a socket path naming a file, a live socket, a bad address;
//! - a served image is locked the way QEMU locks it: a second server, and `qemu-io` or `qemu-img`
//!   writing or resizing, are refused while it is served (readers share it, as with QEMU), and
//!   the proxy is refused while `qemu-nbd` serves it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::migration::*;
use e2e::*;
use migration_stream::{Message, SessionParams};
use nbd_proto::consts::NBD_EPERM;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

const KEY: &str = "fencing-test-key-0123456789abcdef";

/// A source with random data and a receiving destination, in their own directories.
struct Pair {
    src_dir: tempfile::TempDir,
    dst_dir: tempfile::TempDir,
    key: PathBuf,
    src: Host,
    dst: Host,
    port: u16,
    data: Vec<u8>,
}

fn pair(seed: u64) -> Pair {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let key = key_file(src_dir.path(), KEY);
    let (image, data) = source_image(src_dir.path(), seed);
    let src = source(src_dir.path(), &image, &key);
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let dst = destination(dst_dir.path(), &dst_image, &key, port);
    Pair { src_dir, dst_dir, key, src, dst, port, data }
}

impl Pair {
    fn uri(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    /// Pre-copy, then `migrate-finish`: the destination has committed.
    fn hand_over(&self) -> Value {
        let mut ctl = self.src.ctl();
        ctl.ok("migrate-start", json!({"uri": self.uri(), "strategy": "row"}));
        wait_phase(&mut ctl, "ready", HANG_LIMIT);
        let status = ctl.ok("migrate-finish", json!({}));
        assert_eq!(status["phase"], "handed-over", "{status}");
        status
    }

    /// Restarts the source proxy on the same image (after it was killed).
    fn restart_source(&mut self) {
        self.src = source(self.src_dir.path(), &self.src.image, &self.key);
    }

    /// Restarts the destination proxy (`receive`) on the same image.
    fn restart_destination(&mut self) {
        let image = self.dst.image.clone();
        self.dst.server.proc.terminate(HANG_LIMIT);
        self.dst = destination(self.dst_dir.path(), &image, &self.key, self.port);
    }
}

fn write(server: &Server, offset: u64, data: &[u8]) -> u32 {
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let error = c.call(request(Cmd::Write, 1, offset, data.len() as u32), data).unwrap().error;
    if error == 0 {
        assert_eq!(c.call(request(Cmd::Flush, 2, 0, 0), &[]).unwrap().error, 0, "flush");
    }
    error
}

fn read(server: &Server, offset: u64, len: u32) -> Vec<u8> {
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let r = c.call(request(Cmd::Read, 1, offset, len), &[]).unwrap();
    assert_eq!(r.error, 0);
    r.data
}

fn status(host: &Host) -> Value {
    host.ctl().ok("query-status", json!({}))
}

fn wait_status(host: &Host, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let s = status(host);
        if cond(&s) {
            return s;
        }
        assert!(start.elapsed() < HANG_LIMIT, "{what} not reached: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Speaks the migration protocol to the destination as a source holding the key would, with
/// `session` (hex), and sends `first` as the session's first message (sealed, as the key's
/// protection wants after the handshake); returns the answer.
fn as_source(port: u16, session: &str, first: &Message) -> Message {
    use migration_stream::seal::{derive, Opener, Sealer};
    use std::io::{Read, Write};
    let key = migration_stream::Key::from_bytes(KEY.as_bytes());
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(HANG_LIMIT)).unwrap();
    let mut wire = Vec::new();
    let fill = |s: &mut std::net::TcpStream, wire: &mut Vec<u8>| {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the destination closed the connection");
        wire.extend_from_slice(&chunk[..n]);
    };
    let next_plain = |s: &mut std::net::TcpStream, wire: &mut Vec<u8>| loop {
        if let Some((m, n)) = Message::decode(wire).unwrap() {
            wire.drain(..n);
            return m;
        }
        fill(s, wire);
    };
    let Message::ServerHello { nonce: server_nonce, .. } = next_plain(&mut s, &mut wire) else { panic!("no greeting") };
    let mut session_id = [0u8; 16];
    for (i, b) in session_id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&session[2 * i..2 * i + 2], 16).unwrap();
    }
    let params = SessionParams {
        session_id,
        disk_size: SIZE as u64,
        block_size: 4096,
        strategy: migration_stream::Strategy::Row,
    };
    let nonce = migration_stream::nonce();
    let mac = migration_stream::client_mac(&key, &server_nonce, &nonce, &params);
    let mut out = Vec::new();
    Message::ClientHello { version: migration_stream::VERSION, params: params.clone(), nonce, mac }.encode(&mut out);
    s.write_all(&out).unwrap();
    assert!(matches!(next_plain(&mut s, &mut wire), Message::Accept { .. }), "the destination did not accept");
    let keys = derive(&key, &server_nonce, &nonce, &params);
    let mut plain = Vec::new();
    first.encode(&mut plain);
    let mut sealed = Vec::new();
    Sealer::new(&keys.to_destination).seal(&plain, &mut sealed);
    s.write_all(&sealed).unwrap();
    let mut opener = Opener::new(&keys.to_source);
    let mut frames = Vec::new();
    loop {
        if let Some((m, _)) = Message::decode(&frames).unwrap() {
            return m;
        }
        match opener.open(&wire, &mut frames).unwrap() {
            Some(n) => {
                wire.drain(..n);
            }
            None => fill(&mut s, &mut wire),
        }
    }
}

fn error_text(m: Message) -> String {
    match m {
        Message::Error { message } => message,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn a_committed_destination_keeps_its_disk_and_the_source_stays_fenced_across_restarts() {
    let mut p = pair(11);
    let handed = p.hand_over();
    let session = handed["session"].as_str().unwrap().to_string();
    // The source refuses writes; the destination serves the disk and its first write makes it
    // the owner.
    assert_eq!(write(&p.src.server, 0, &[1; 4096]), NBD_EPERM);
    assert_eq!(status(&p.dst)["incoming-phase"], "committed");
    assert_eq!(write(&p.dst.server, 4096, &[0xd5; 4096]), 0);
    assert_eq!(status(&p.dst)["incoming-phase"], "owner");

    // The source dies (the migration connection is reset): the destination keeps everything.
    signal(p.src.server.proc.pid(), libc::SIGKILL);
    let _ = p.src.server.proc.child.wait();
    std::thread::sleep(Duration::from_millis(300));
    let s = status(&p.dst);
    assert_eq!((s["incoming"].as_bool(), s["incoming-phase"].as_str()), (Some(false), Some("owner")), "{s}");
    assert_eq!(read(&p.dst.server, 4096, 4096), vec![0xd5; 4096]);
    let mut want = p.data.clone();
    want[4096..8192].fill(0xd5);
    assert!(read_all(&p.dst.server) == want, "the destination's disk changed");

    // An authenticated discard of that session, and a new session, are refused.
    let e = error_text(as_source(p.port, &session, &Message::Discard { reason: "test".into() }));
    assert!(e.contains("discard after the commit"), "{e}");
    let other = "ab".repeat(16);
    let e = error_text(as_source(
        p.port,
        &other,
        &Message::RoundBegin { round: 1, kind: migration_stream::RoundKind::Base },
    ));
    assert!(e.contains("holds the disk"), "{e}");
    // A revoke of the session: this host has written, so it is refused too.
    let e = error_text(as_source(p.port, &session, &Message::Revoke));
    assert!(e.contains("owns the disk"), "{e}");

    // The destination restarts: it serves the disk read-write at once, and still refuses.
    p.restart_destination();
    let s = status(&p.dst);
    assert_eq!((s["incoming"].as_bool(), s["incoming-phase"].as_str()), (Some(false), Some("owner")), "{s}");
    assert!(read_all(&p.dst.server) == want, "the destination's disk changed across its restart");
    assert_eq!(write(&p.dst.server, 8192, &[0xd6; 4096]), 0);

    // The source restarts: it still refuses writes, and says why and since when.
    p.restart_source();
    assert_eq!(write(&p.src.server, 0, &[1; 4096]), NBD_EPERM);
    let s = status(&p.src);
    let fence = &s["fence"];
    assert_eq!(fence["session"], session.as_str(), "{s}");
    assert_eq!(fence["phase"], "handed-over", "{s}");
    assert!(fence["since"].as_str().unwrap().contains('T'), "{s}");
    assert!(s["writes-refused"].as_str().unwrap().contains("handed over"), "{s}");
    // It cannot take the disk back: the destination owns it.
    let e = p.src.ctl().execute("migrate-cancel", json!({})).unwrap_err();
    assert!(e.contains("owns the disk"), "{e}");
    let e = p.src.ctl().execute("reclaim", json!({})).unwrap_err();
    assert!(e.contains("owns the disk"), "{e}");
    assert_eq!(write(&p.src.server, 0, &[1; 4096]), NBD_EPERM);
    // An operator who knows better can force it.
    p.src.ctl().ok("reclaim", json!({"force": true}));
    assert_eq!(write(&p.src.server, 0, &[1; 4096]), 0);
    wait_status(&p.src, "direct mode", |s| s["mode"] == "direct" && s["fence"].is_null());
}

#[test]
fn a_revoke_gives_the_disk_back_while_the_destination_has_not_written() {
    let mut p = pair(12);
    p.hand_over();
    assert_eq!(write(&p.src.server, 0, &[1; 4096]), NBD_EPERM);
    // The switchover failed: the source takes its disk back; the destination agrees (no writes).
    p.src.ctl().ok("migrate-cancel", json!({}));
    assert_eq!(p.src.ctl().ok("query-migrate", json!({}))["phase"], "cancelled");
    assert_eq!(write(&p.src.server, 0, &[2; 4096]), 0, "the source takes writes again");
    let s = status(&p.dst);
    assert_eq!((s["incoming"].as_bool(), s["incoming-phase"].as_str()), (Some(true), Some("waiting")), "{s}");
    assert_eq!(write(&p.dst.server, 0, &[3; 4096]), NBD_EPERM, "the destination gave the disk up");
    wait_status(&p.src, "direct mode", |s| s["mode"] == "direct");

    // A restart of the destination keeps it waiting, and a new migration then works.
    p.restart_destination();
    assert_eq!(status(&p.dst)["incoming-phase"], "waiting");
    let mut want = p.data.clone();
    want[..4096].fill(2);
    p.hand_over();
    p.src.ctl().ok("migrate-complete", json!({}));
    assert_eq!(p.src.ctl().ok("query-migrate", json!({}))["phase"], "completed");
    assert_eq!(status(&p.dst)["incoming-phase"], "owner");
    assert!(read_all(&p.dst.server) == want, "the second migration's disk differs");
    let e = p.src.ctl().execute("migrate-cancel", json!({})).unwrap_err();
    assert!(e.contains("completed"), "{e}");
}

#[test]
fn the_source_restarted_during_the_hand_over_asks_before_taking_its_disk_back() {
    let mut p = pair(13);
    p.hand_over();
    signal(p.src.server.proc.pid(), libc::SIGKILL);
    let _ = p.src.server.proc.child.wait();
    // The destination goes away too: nobody can say whether it has written.
    p.dst.server.proc.terminate(HANG_LIMIT);
    p.restart_source();
    assert_eq!(write(&p.src.server, 0, &[1; 4096]), NBD_EPERM);
    let e = p.src.ctl().execute("migrate-cancel", json!({})).unwrap_err();
    assert!(e.contains("cannot ask the destination"), "{e}");
    assert_eq!(write(&p.src.server, 0, &[1; 4096]), NBD_EPERM, "still refused");
    // It comes back, committed and unwritten: the question gets an answer, and the disk comes back.
    p.restart_destination();
    assert_eq!(status(&p.dst)["incoming-phase"], "committed");
    p.src.ctl().ok("migrate-cancel", json!({}));
    assert_eq!(write(&p.src.server, 0, &[1; 4096]), 0);
    assert_eq!(status(&p.dst)["incoming-phase"], "waiting");
}

#[test]
fn control_commands_out_of_order_answer_errors_and_leave_the_proxy_usable() {
    let p = pair(14);
    let mut ctl = p.src.ctl();
    let e = ctl.execute("migrate-finish", json!({})).unwrap_err();
    assert!(e.contains("no migration"), "{e}");
    let e = ctl.execute("migrate-complete", json!({})).unwrap_err();
    assert!(e.contains("no migration"), "{e}");
    assert!(ctl.execute("reclaim", json!({})).unwrap_err().contains("nothing to reclaim"));
    ctl.ok("migrate-start", json!({"uri": p.uri(), "strategy": "row", "max-bandwidth": 4 << 20}));
    let e = ctl.execute("migrate-start", json!({"uri": p.uri()})).unwrap_err();
    assert!(e.contains("already"), "{e}");
    // migrate-finish during pre-copy is refused, not a crash.
    wait_status(&p.src, "ROW mode", |s| s["mode"] == "row");
    let e = ctl.execute("migrate-finish", json!({})).unwrap_err();
    assert!(e.contains("pre-copy is still running"), "{e}");
    let e = ctl.execute("migrate-complete", json!({})).unwrap_err();
    assert!(e.contains("needs the hand-over"), "{e}");
    let e = ctl.execute("row-stop", json!({})).unwrap_err();
    assert!(e.contains("migration uses the overlay"), "{e}");
    // The migration goes on and completes.
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over");
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over", "finishing twice is harmless");
    ctl.ok("migrate-complete", json!({}));
    ctl.ok("migrate-complete", json!({}));
    assert!(read_all(&p.dst.server) == p.data);
}

fn proxy(args: &[&str]) -> std::process::Output {
    let image = args.iter().position(|a| *a == "--image").map(|i| Path::new(args[i + 1]));
    let mut cmd = Command::new(bin("nbd-row-proxy"));
    if let Some(image) = image {
        cmd.env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(image));
    }
    cmd.args(args).output().unwrap()
}

fn refused(args: &[&str], words: &str) {
    let out = proxy(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nbd-row-proxy {args:?} started");
    assert!(err.contains(words), "nbd-row-proxy {args:?} should say {words:?}:\n{err}");
}

#[test]
fn typos_destroy_nothing_and_a_failed_start_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let data = random_bytes(5, 1 << 20);
    std::fs::write(&image, &data).unwrap();
    let img = image.to_str().unwrap();
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "keep me").unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    refused(&["serve", "--image", img, "--socket", img], "not a socket");
    refused(&["serve", "--image", img, "--socket", other.to_str().unwrap()], "not a socket");
    refused(
        &["serve", "--image", img, "--socket", &d("nbd.sock"), "--control", other.to_str().unwrap()],
        "not a socket",
    );
    refused(&["serve", "--image", img, "--socket", &d("nbd.sock"), "--control", &d("nbd.sock")], "same path");
    refused(&["serve", "--image", img, "--socket", &d("nbd.sock"), "--tcp", "nowhere"], "not an address");
    refused(&["receive", "--image", img, "--socket", &d("nbd.sock"), "--listen", "1.2.3.4:99999"], "not an address");
    refused(&["serve", "--image", &d("missing.raw"), "--socket", &d("nbd.sock")], "missing.raw");
    refused(&["serve", "--image", img, "--socket", &d("no/such/dir/nbd.sock")], "does not exist");
    refused(&["serve", "--image", img, "--socket", &d("nbd.sock"), "--hot-threshold", "0"], "hot-threshold");
    // A port in use fails after the Unix socket was bound: that socket is removed again.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    refused(
        &[
            "serve",
            "--image",
            img,
            "--socket",
            &d("nbd.sock"),
            "--control",
            &d("ctl.sock"),
            "--tcp",
            &busy,
            "--insecure",
        ],
        "binding",
    );
    assert_eq!(std::fs::read(&image).unwrap(), data, "the image changed");
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep me");
    let mut left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    // The disk's state entry (in the rig, `state/` beside the image) is its home, kept for the
    // next start; nothing else is left.
    assert_eq!(left, ["disk.raw", "notes.txt", "state"], "a failed start left files behind");

    // A live socket is never taken over.
    let server = Server::start(dir.path(), &image, &[]);
    refused(&["serve", "--image", img, "--socket", server.socket.to_str().unwrap()], "in use");
}

#[test]
fn a_served_image_is_locked_against_qemu_tools_and_a_second_server() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let img = image.to_str().unwrap();
    let server = Server::start(dir.path(), &image, &[]);
    let second = dir.path().join("second.sock");
    refused(&["serve", "--image", img, "--socket", second.to_str().unwrap()], "in use");
    assert!(!second.exists());
    let io = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 9 0 512", img]).output().unwrap();
    assert!(!io.status.success(), "qemu-io wrote to an image the proxy serves");
    assert!(String::from_utf8_lossy(&io.stderr).contains("lock"), "{}", String::from_utf8_lossy(&io.stderr));
    let resize = Command::new("qemu-img").args(["resize", "-f", "raw", img, "2M"]).output().unwrap();
    assert!(!resize.status.success(), "qemu-img resized an image the proxy serves");
    assert!(String::from_utf8_lossy(&resize.stderr).contains("lock"), "{}", String::from_utf8_lossy(&resize.stderr));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);
    // Reading is shared, as between QEMU and its tools.
    let ro = Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read 0 512", img]).output().unwrap();
    assert!(ro.status.success(), "{}", String::from_utf8_lossy(&ro.stderr));
    drop(server);

    // The other way round: while qemu-nbd serves the image, the proxy refuses it.
    require_tool("qemu-nbd");
    let sock = dir.path().join("qemu-nbd.sock");
    let mut q = Proc::spawn(
        "qemu-nbd",
        Command::new("qemu-nbd").args(["-f", "raw", "-k", sock.to_str().unwrap(), img]),
        &dir.path().join("qemu-nbd.log"),
    );
    q.wait_for_socket(&sock);
    refused(&["serve", "--image", img, "--socket", dir.path().join("p.sock").to_str().unwrap()], "in use");
    q.terminate(Duration::from_secs(5));
    let _ = Path::new(&sock);
}

#[test]
fn the_fence_follows_the_disk_through_links_and_a_new_image_at_an_old_path_is_a_new_disk() {
    let p = pair(12);
    p.hand_over();
    let Pair { src_dir, dst_dir, key, src, dst, port, .. } = p;
    let (src_image, dst_image) = (src.image.clone(), dst.image.clone());
    drop(src);
    // The host's one state directory; the disk under other names in another directory.
    let state = state_dir_of(&src_image);
    let args = |extra: &[&str]| {
        let mut a = vec!["--auth-key-file", key.to_str().unwrap(), "--state-dir", state.to_str().unwrap()];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let elsewhere = tempfile::tempdir().unwrap();
    let hard = elsewhere.path().join("hard.raw");
    std::fs::hard_link(&src_image, &hard).unwrap();
    let sym = elsewhere.path().join("sym.raw");
    std::os::unix::fs::symlink(&src_image, &sym).unwrap();
    for alias in [&hard, &sym] {
        let a = args(&[]);
        let host = source_with(elsewhere.path(), alias, &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(write(&host.server, 0, &[1; 4096]), NBD_EPERM, "{} bypassed the fence", alias.display());
        assert_eq!(status(&host)["fence"]["phase"], "handed-over");
    }
    // A copy keeps the disk id (cp --preserve=xattr, rsync -X): refused, never fenced or adopted.
    let copy = elsewhere.path().join("copy.raw");
    run_ok(Command::new("cp").arg("--preserve=xattr").arg(&src_image).arg(&copy));
    let sock = elsewhere.path().join("copy.sock");
    let out = proxy(&[
        "serve",
        "--image",
        copy.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("a copy of an image keeps its disk id"), "{err}");

    // On B, a fresh image where the received one was is a new disk: it waits for a migration.
    drop(dst);
    std::fs::remove_file(&dst_image).unwrap();
    sparse_file(&dst_image, SIZE as u64);
    let fresh = destination(dst_dir.path(), &dst_image, &key, port);
    assert_eq!(status(&fresh)["incoming-phase"], "waiting");
    drop(src_dir);
}

/// A loop device attached to `file`; detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(file).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Self(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("--detach").arg(&self.0).status();
    }
}

#[test]
fn a_loop_device_disk_migrates_and_its_state_survives_a_simulated_reboot() {
    require_tool("losetup");
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let key = key_file(src_dir.path(), KEY);
    let (backing, data) = source_image(src_dir.path(), 13);
    let state = src_dir.path().join("var-lib-state");
    let dev = Loop::attach(&backing);
    let protection = ["--auth-key-file", key.to_str().unwrap(), "--state-dir", state.to_str().unwrap()];
    let dev_dir = |dev: &Path| std::fs::read_dir(dev.parent().unwrap()).unwrap().count();
    let in_dev_before = dev_dir(&dev.0);

    // ROW on the device, a flushed write, then the proxy is killed and the "host reboots" (the
    // loop device goes away and comes back, perhaps under another number).
    let src = source_with(src_dir.path(), &dev.0, &protection);
    src.ctl().ok("row-start", json!({}));
    assert_eq!(write(&src.server, 8192, &[0x5a; 4096]), 0);
    signal(src.server.proc.pid(), libc::SIGKILL);
    drop(src);
    drop(dev);
    let dev = Loop::attach(&backing);
    let src = source_with(src_dir.path(), &dev.0, &protection);
    assert_eq!(status(&src)["mode"], "row", "the overlay came back");
    assert_eq!(read(&src.server, 8192, 4096), vec![0x5a; 4096], "the flushed ROW write survived");
    src.ctl().ok("row-stop", json!({"wait": true}));

    // Migrated to B, the device's fence survives the next "reboot" too.
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let dst = destination(dst_dir.path(), &dst_image, &key, port);
    let mut ctl = src.ctl();
    ctl.ok("migrate-start", json!({"uri": format!("tcp:127.0.0.1:{port}"), "strategy": "row"}));
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over");
    let mut want = data;
    want[8192..12288].fill(0x5a);
    assert!(read_all(&dst.server) == want, "B holds the device's disk");
    drop(ctl);
    drop(src);
    drop(dev);
    let dev = Loop::attach(&backing);
    let src = source_with(src_dir.path(), &dev.0, &protection);
    assert_eq!(write(&src.server, 0, &[1; 4096]), NBD_EPERM, "the fence is gone after a reboot");
    assert_eq!(status(&src)["fence"]["phase"], "handed-over");
    // Nothing of ours was ever put in /dev.
    assert_eq!(dev_dir(&dev.0), in_dev_before, "files appeared in /dev");
    drop(src);
}

/// A tmpfs mounted at a path; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at));
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("--lazy").arg(&self.0).status();
    }
}

#[test]
fn a_full_state_disk_at_the_first_write_answers_enospc_and_leaves_no_temporary_file() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let key = key_file(src_dir.path(), KEY);
    let (image, _) = source_image(src_dir.path(), 14);
    let src = source(src_dir.path(), &image, &key);
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    // B's state directory is a small file system of its own.
    let state = Tmpfs::mount(&state_dir_of(&dst_image), "1m");
    let port = free_port();
    let dst = destination(dst_dir.path(), &dst_image, &key, port);
    let mut ctl = src.ctl();
    ctl.ok("migrate-start", json!({"uri": format!("tcp:127.0.0.1:{port}"), "strategy": "row"}));
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over");
    assert_eq!(status(&dst)["incoming-phase"], "committed");

    // The state disk fills up: the guest's first write cannot be recorded as the owner's.
    let filler = state.0.join("filler");
    let _ = Command::new("dd").arg("if=/dev/zero").arg(format!("of={}", filler.display())).arg("bs=64k").status();
    assert_eq!(write(&dst.server, 0, &[7; 4096]), nbd_proto::consts::NBD_ENOSPC, "{}", dst.server.proc.log_text());
    assert_eq!(status(&dst)["incoming-phase"], "committed", "still committed, not owner");
    let leftovers: Vec<_> = walk(&state.0).into_iter().filter(|p| p.to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let log = dst.server.proc.log_text();
    assert!(log.contains("recording this host as the disk's owner failed"), "no WARN:\n{log}");

    // Room again: the write goes through and B owns the disk.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(write(&dst.server, 0, &[7; 4096]), 0);
    assert_eq!(status(&dst)["incoming-phase"], "owner");
    assert_eq!(read(&dst.server, 0, 4096), vec![7; 4096]);
    drop((ctl, src, dst));
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
