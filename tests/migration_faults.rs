//! Migration faults: the TCP connection cut in round 1, round 2 and the final round, the
//! destination killed, a wrong key, a corrupted frame and a full destination disk. Each time
//! the migration ends `failed` with an error that says why, the source keeps its data and
//! takes writes again, goes back to direct mode (the ROW overlay merged back), and a new
//! migration to a healthy destination then succeeds.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::migration::*;
use e2e::*;
use nbd_proto::consts::NBD_EPERM;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

const KEY: &str = "fault-injection-key-0123456789abcdef";
/// Data in the fault tests' source images: the first 12 MiB are random, the rest a hole, so
/// round 1 is about 12 MiB on the wire (random data does not compress; holes are skipped).
const DATA: usize = 12 << 20;
/// What a broken connection looks like in the source's error.
const CONNECTION_WORDS: &[&str] =
    &["closed the connection", "Connection reset", "Broken pipe", "sending to the destination"];

// ---------------------------------------------------------------------------------------------
// A TCP relay with fault injection.

/// Faults the relay injects into the source→destination direction.
#[derive(Default)]
struct Faults {
    /// Source→destination bytes forwarded so far.
    forwarded: AtomicU64,
    /// Cut the connection once this many bytes went through (0 = never).
    cut_at: AtomicU64,
    /// Cut the connection when the next source→destination data arrives (nothing forwarded).
    cut_on_next: AtomicBool,
    /// Flip (xor 0xff) the byte at this stream offset (0 = never).
    flip_at: AtomicU64,
    /// Where the cut happened, once it did.
    cut_offset: Mutex<Option<u64>>,
    /// Whether the flip happened.
    flipped: AtomicBool,
}

/// Listens on a free loopback port, connects each client to `target` and copies both ways.
struct Relay {
    port: u16,
    faults: Arc<Faults>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (f, c) = (faults.clone(), conns.clone());
        // One connection is all a test needs; the thread ends after it.
        std::thread::spawn(move || {
            let Ok((src, _)) = listener.accept() else { return };
            let dst = TcpStream::connect(("127.0.0.1", target)).expect("relay: cannot reach the destination");
            src.set_nodelay(true).unwrap();
            dst.set_nodelay(true).unwrap();
            c.lock().unwrap().extend([src.try_clone().unwrap(), dst.try_clone().unwrap()]);
            let kill = {
                let pair = Arc::new((src.try_clone().unwrap(), dst.try_clone().unwrap()));
                move || {
                    let _ = pair.0.shutdown(Shutdown::Both);
                    let _ = pair.1.shutdown(Shutdown::Both);
                }
            };
            let back = {
                let (mut s, mut d, kill) = (src.try_clone().unwrap(), dst.try_clone().unwrap(), kill.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n @ 1..) = d.read(&mut buf) {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    kill();
                })
            };
            forward(src, dst, &f, &kill);
            kill();
            let _ = back.join();
            // Both sockets close here; later data from the source is answered with a reset.
        });
        Self { port, faults, conns }
    }

    fn uri(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    fn forwarded(&self) -> u64 {
        self.faults.forwarded.load(Ordering::SeqCst)
    }

    fn cut_offset(&self) -> Option<u64> {
        *self.faults.cut_offset.lock().unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for s in self.conns.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Source → destination, with the faults applied.
fn forward(mut src: TcpStream, mut dst: TcpStream, f: &Faults, kill: &impl Fn()) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let pos = f.forwarded.load(Ordering::SeqCst);
        if f.cut_on_next.load(Ordering::SeqCst) {
            *f.cut_offset.lock().unwrap() = Some(pos);
            kill();
            return;
        }
        let cut_at = f.cut_at.load(Ordering::SeqCst);
        let cut_here = cut_at > 0 && cut_at < pos + n as u64;
        let len = if cut_here { cut_at.saturating_sub(pos) as usize } else { n };
        let flip_at = f.flip_at.load(Ordering::SeqCst);
        if flip_at > 0 && (pos..pos + len as u64).contains(&flip_at) {
            buf[(flip_at - pos) as usize] ^= 0xff;
            f.flipped.store(true, Ordering::SeqCst);
        }
        if dst.write_all(&buf[..len]).is_err() {
            return;
        }
        f.forwarded.fetch_add(len as u64, Ordering::SeqCst);
        if cut_here {
            *f.cut_offset.lock().unwrap() = Some(pos + len as u64);
            kill();
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pieces every case shares.

/// A source proxy over an image whose first [`DATA`] bytes are random and the rest a hole.
struct Src {
    dir: tempfile::TempDir,
    host: Host,
    data: Vec<u8>,
}

fn start_source(seed: u64) -> Src {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let image = dir.path().join("disk.raw");
    let mut data = random_bytes(seed, SIZE);
    data[DATA..].fill(0);
    std::fs::write(&image, &data).unwrap();
    punch_hole(&image, DATA as u64, (SIZE - DATA) as u64);
    let host = source(dir.path(), &image, &key);
    Src { dir, host, data }
}

impl Src {
    fn key(&self) -> PathBuf {
        self.dir.path().join("key")
    }

    fn migrate_start(&self, uri: &str, extra: Value) -> Result<Value, String> {
        let mut args = json!({"uri": uri, "strategy": "row"});
        args.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        self.host.ctl().execute("migrate-start", args)
    }
}

/// A destination proxy receiving into a 32 MiB sparse image in `image_dir` (or its own
/// directory).
struct Dst {
    _dir: tempfile::TempDir,
    host: Host,
    port: u16,
}

fn start_destination(key: &Path, image_dir: Option<&Path>) -> Dst {
    let dir = tempfile::tempdir().unwrap();
    let image = image_dir.unwrap_or(dir.path()).join("disk.raw");
    sparse_file(&image, SIZE as u64);
    let port = free_port();
    let host = destination(dir.path(), &image, key, port);
    Dst { _dir: dir, host, port }
}

/// Polls `query-migrate` until the migration failed; returns that status.
fn wait_failed(ctl: &mut ControlClient, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let status = ctl.ok("query-migrate", json!({}));
        if status["phase"] == "failed" {
            return status;
        }
        assert!(
            !matches!(status["phase"].as_str(), Some("handed-over" | "completed" | "cancelled")),
            "the migration should have failed: {status}"
        );
        assert!(start.elapsed() < timeout, "the migration did not fail within {timeout:?}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `query-migrate` until `cond` holds.
fn wait_status(ctl: &mut ControlClient, what: &str, timeout: Duration, cond: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let status = ctl.ok("query-migrate", json!({}));
        if cond(&status) {
            return status;
        }
        assert!(status["phase"] != "failed", "failed while waiting for {what}: {status}");
        assert!(start.elapsed() < timeout, "{what} not reached within {timeout:?}: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn error_of(status: &Value) -> String {
    status["error"].as_str().unwrap_or_else(|| panic!("a failed migration without an error text: {status}")).to_string()
}

fn assert_mentions(text: &str, words: &[&str], what: &str) {
    assert!(words.iter().any(|w| text.contains(w)), "{what} should mention one of {words:?}: {text:?}");
}

/// The round in progress at the failure and the kinds of the rounds that finished.
fn rounds_at_failure(status: &Value) -> (u64, Vec<String>) {
    let done = status["rounds"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap().to_string()).collect();
    (status["round"].as_u64().unwrap(), done)
}

/// Polls `query-status` until the disk is back in direct mode (overlay merged back, files gone).
fn wait_direct(src: &Src, timeout: Duration) -> Value {
    let mut ctl = src.host.ctl();
    let start = Instant::now();
    loop {
        let status = ctl.ok("query-status", json!({}));
        if status["mode"] == "direct" {
            assert!(status["writes-refused"].is_null() || status["writes-refused"] == false, "{status}");
            let reserved = state_entry_of(&src.host.image).join("overlay");
            assert!(!reserved.exists(), "{} is still there in direct mode", reserved.display());
            return status;
        }
        assert!(start.elapsed() < timeout, "the source did not go back to direct mode within {timeout:?}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a failure: (b) no data lost and writes taken again, (c) direct mode, (d) a new
/// migration to a fresh, healthy destination succeeds and matches. `writer` is the one that ran
/// through the failure, if any; `model` the disk otherwise.
fn recover(src: &Src, writer: Option<Writer>, model: Vec<u8>, seed: u64) {
    wait_direct(src, HANG_LIMIT);
    // Writes go through again: the writer keeps going (or a new one starts) after the merge.
    let writer = writer.unwrap_or_else(|| Writer::start(&src.host.server.socket, model, seed ^ 0xabc, 1000));
    std::thread::sleep(Duration::from_millis(300));
    writer.wait_writes(51);
    let (model, writes) = writer.stop();
    assert!(writes > 50, "the writer made only {writes} writes");
    assert!(read_all(&src.host.server) == model, "the source lost data in the failed migration");
    let dst = start_destination(&src.key(), None);
    migrate_to(src, &dst, model, seed);
}

/// A migration under load to `dst` that must succeed and leave identical disks.
fn migrate_to(src: &Src, dst: &Dst, model: Vec<u8>, seed: u64) {
    let (status, model) = migrate_under_load(&src.host, dst.port, "row", model, seed);
    assert!(read_all(&src.host.server) == model, "the source lost a write in the second migration");
    assert!(std::fs::read(&dst.host.image).unwrap() == model, "the destination differs from the source");
    assert!(status["rounds"].as_array().unwrap().len() >= 3, "{status}");
    src.host.ctl().ok("migrate-complete", json!({}));
}

/// A write to a destination that has not committed is refused.
fn assert_uncommitted(dst: &Dst) {
    let status = dst.host.ctl().ok("query-status", json!({}));
    assert_eq!(status["incoming"], true, "{status}");
    let mut c = RawClient::connect(&dst.host.server.socket, "", true).unwrap();
    assert_eq!(c.call(request(Cmd::Write, 1, 0, 4096), &[7; 4096]).unwrap().error, NBD_EPERM);
}

// ---------------------------------------------------------------------------------------------
// Connection cuts.

#[test]
fn connection_cut_in_round_1() {
    let src = start_source(101);
    let dst = start_destination(&src.key(), None);
    let relay = Relay::start(dst.port);
    relay.faults.cut_at.store(2 << 20, Ordering::SeqCst);
    let writer = Writer::start(&src.host.server.socket, src.data.clone(), 1, 1000);
    src.migrate_start(&relay.uri(), json!({"max-bandwidth": 16 << 20})).unwrap();
    let status = wait_failed(&mut src.host.ctl(), HANG_LIMIT);
    let error = error_of(&status);
    eprintln!("cut in round 1: {error}");
    assert_mentions(&error, CONNECTION_WORDS, "the error");
    assert_eq!(relay.cut_offset(), Some(2 << 20));
    assert_eq!(rounds_at_failure(&status), (1, vec![]), "{status}");
    recover(&src, Some(writer), Vec::new(), 2);
}

#[test]
fn connection_cut_in_round_2() {
    let src = start_source(102);
    let dst = start_destination(&src.key(), None);
    let relay = Relay::start(dst.port);
    // Uniform writes during a slow round 1 leave many cold blocks for round 2.
    let writer = Writer::start_with(&src.host.server.socket, src.data.clone(), 3, 1500, 0);
    src.migrate_start(&relay.uri(), json!({"max-bandwidth": 8 << 20})).unwrap();
    let mut ctl = src.host.ctl();
    // Between the end of round 1 and the start of round 2 (while round 2 is planned) the status
    // still shows round 1 as the last one done: wait for round 2 itself.
    let status = wait_status(&mut ctl, "the start of round 2", HANG_LIMIT, |s| {
        s["rounds"].as_array().is_some_and(|r| !r.is_empty()) && s["round"].as_u64().is_some_and(|r| r >= 2)
    });
    let round1 = &status["rounds"][0];
    assert_eq!(round1["kind"], "base", "{status}");
    assert_eq!(status["round"], 2, "round 2 should be running: {status}");
    let round2_blocks = status["round-remaining-blocks"].as_u64().unwrap();
    assert!(round2_blocks > 512, "round 2 is too small to cut in: {status}");
    // Round 1 ends at its wire bytes plus the session request (under 1 KiB) in the stream.
    let cut = round1["wire-bytes"].as_u64().unwrap() + 1024 + (1 << 20);
    relay.faults.cut_at.store(cut, Ordering::SeqCst);
    assert!(relay.forwarded() < cut, "round 2 went past the cut point before it was set");
    let status = wait_failed(&mut ctl, HANG_LIMIT);
    let error = error_of(&status);
    eprintln!("cut in round 2 after {} bytes (round 1: {} wire bytes): {error}", cut, round1["wire-bytes"]);
    assert_mentions(&error, CONNECTION_WORDS, "the error");
    assert_eq!(relay.cut_offset(), Some(cut));
    assert_eq!(rounds_at_failure(&status), (2, vec!["base".to_string()]), "{status}");
    recover(&src, Some(writer), Vec::new(), 4);
}

#[test]
fn connection_cut_in_the_final_round() {
    let src = start_source(103);
    let dst = start_destination(&src.key(), None);
    let relay = Relay::start(dst.port);
    let writer = Writer::start(&src.host.server.socket, src.data.clone(), 5, 1500);
    src.migrate_start(&relay.uri(), json!({"max-bandwidth": 40 << 20})).unwrap();
    let mut ctl = src.host.ctl();
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    std::thread::sleep(Duration::from_millis(200));
    let (model, _) = writer.stop();
    // The source idles in `ready`: the next bytes it sends are the final round's.
    let before = relay.forwarded();
    relay.faults.cut_on_next.store(true, Ordering::SeqCst);
    let error = ctl.execute("migrate-finish", json!({})).expect_err("migrate-finish should fail");
    eprintln!("cut in the final round: {error}");
    assert_mentions(&error, CONNECTION_WORDS, "migrate-finish's error");
    assert_eq!(relay.cut_offset(), Some(before), "the cut should come with the final round's first bytes");
    let status = wait_failed(&mut ctl, HANG_LIMIT);
    assert_mentions(&error_of(&status), CONNECTION_WORDS, "the error");
    // Base, cold updates, and settle passes as many as the link's rate asked for; the round that
    // failed is the final one, after them.
    let (failed_round, done) = rounds_at_failure(&status);
    assert_eq!(failed_round, done.len() as u64 + 1, "{status}");
    assert!(done.len() >= 2 && done[0] == "base" && done[1..].iter().all(|k| k == "update"), "{status}");
    assert_uncommitted(&dst);
    recover(&src, None, model, 6);
}

// ---------------------------------------------------------------------------------------------
// The destination's faults.

#[test]
fn destination_killed_in_round_1() {
    let src = start_source(104);
    let mut dst = start_destination(&src.key(), None);
    let writer = Writer::start(&src.host.server.socket, src.data.clone(), 7, 1000);
    src.migrate_start(&format!("tcp:127.0.0.1:{}", dst.port), json!({"max-bandwidth": 8 << 20})).unwrap();
    let mut ctl = src.host.ctl();
    let status = wait_status(&mut ctl, "some of round 1", HANG_LIMIT, |s| {
        s["round"] == 1 && s["round-remaining-blocks"].as_u64().is_some_and(|r| r > 0 && r < (DATA / BS) as u64 * 3 / 4)
    });
    signal(dst.host.server.proc.pid(), libc::SIGKILL);
    let _ = dst.host.server.proc.wait_or_kill(Duration::from_secs(5));
    let status = {
        let failed = wait_failed(&mut ctl, HANG_LIMIT);
        eprintln!(
            "destination killed at {} blocks left in round 1: {}",
            status["round-remaining-blocks"], failed["error"]
        );
        failed
    };
    assert_mentions(&error_of(&status), CONNECTION_WORDS, "the error");
    assert_eq!(rounds_at_failure(&status), (1, vec![]), "{status}");
    recover(&src, Some(writer), Vec::new(), 8);
}

#[test]
fn wrong_key_on_the_destination() {
    let src = start_source(105);
    let other = tempfile::tempdir().unwrap();
    let wrong = key_file(other.path(), "a-different-key-0123456789abcdef0123");
    let dst = start_destination(&wrong, None);
    let error = src
        .migrate_start(&format!("tcp:127.0.0.1:{}", dst.port), json!({}))
        .expect_err("migrate-start with a wrong key should fail");
    eprintln!("wrong key: {error}");
    assert_mentions(&error, &["authentication"], "migrate-start's error");
    // Nothing changed on the source.
    let status = src.host.ctl().ok("query-status", json!({}));
    assert_eq!(status["mode"], "direct", "{status}");
    assert!(status["reserved"].is_null(), "{status}");
    assert!(!state_entry_of(&src.host.image).join("overlay").exists());
    // The attempt is on record, as failed, and nothing else changed.
    let m = src.host.ctl().ok("query-migrate", json!({}));
    assert_eq!(m["phase"], "failed", "{m}");
    assert_mentions(m["error"].as_str().unwrap_or_default(), &["authentication"], "query-migrate's error");
    assert!(read_all(&src.host.server) == src.data);
    // The destination refused the session and is still waiting for one.
    assert!(dst.host.server.proc.log_text().contains("authentication failed"), "{}", dst.host.server.proc.log_text());
    assert_uncommitted(&dst);
    recover(&src, None, src.data.clone(), 10);
}

#[test]
fn corrupted_frame() {
    let src = start_source(106);
    let mut dst = start_destination(&src.key(), None);
    let relay = Relay::start(dst.port);
    // Inside the second data frame's payload (1 MiB frames of random data).
    relay.faults.flip_at.store((1 << 20) + 12345, Ordering::SeqCst);
    let writer = Writer::start(&src.host.server.socket, src.data.clone(), 11, 1000);
    src.migrate_start(&relay.uri(), json!({"max-bandwidth": 32 << 20})).unwrap();
    let status = wait_failed(&mut src.host.ctl(), HANG_LIMIT);
    assert!(relay.faults.flipped.load(Ordering::SeqCst));
    let error = error_of(&status);
    eprintln!("corrupted frame: {error}");
    assert_mentions(&error, &["failed authentication", "checksum"], "the source's error");
    assert_eq!(rounds_at_failure(&status), (1, vec![]), "{status}");
    // The stream is sealed: the altered record fails authentication at the destination.
    let log = wait_for_log(&mut dst.host.server.proc, "failed authentication", HANG_LIMIT);
    assert!(log.contains("the stream was altered"), "{log}");
    // The destination did not commit and takes a new session.
    assert_uncommitted(&dst);
    wait_direct(&src, HANG_LIMIT);
    let (model, _) = writer.stop();
    assert!(read_all(&src.host.server) == model, "the source lost data");
    migrate_to(&src, &dst, model, 12);
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run_ok(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path()),
        );
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount").arg(self.0.path()).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
        }
    }
}

#[test]
fn destination_disk_full() {
    let src = start_source(107);
    // Declared before the destination so that the process is gone before the unmount.
    let small = Tmpfs::mount("8m");
    let dst = start_destination(&src.key(), Some(small.0.path()));
    let writer = Writer::start(&src.host.server.socket, src.data.clone(), 13, 1000);
    // Slow enough that the destination runs out of space while round 1 is still being sent
    // (unpaced, all of round 1 fits in the socket buffers before the first write fails).
    src.migrate_start(&format!("tcp:127.0.0.1:{}", dst.port), json!({"max-bandwidth": 16 << 20})).unwrap();
    let status = wait_failed(&mut src.host.ctl(), HANG_LIMIT);
    let error = error_of(&status);
    eprintln!("destination disk full: {error}");
    assert_mentions(&error, &["No space left"], "the source's error");
    // The destination fails while it writes round 1; a loaded machine's destination may lag
    // behind the sender by the socket buffers, so the source may already be in round 2.
    let (round, done) = rounds_at_failure(&status);
    assert!(round <= 2 && done.iter().all(|k| k == "base"), "{status}");
    assert_uncommitted(&dst);
    recover(&src, Some(writer), Vec::new(), 14);
    drop(dst);
}
