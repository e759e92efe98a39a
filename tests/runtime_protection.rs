//! Protection changed on running proxies: a source started without any gets a key by
//! `reload-protection` and migrates; the key file is then rotated on both sides (SIGHUP on the
//! source, `reload-protection` with no arguments on the destination) while an NBD client keeps
//! writing on one connection that never notices; a reload that fails changes nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::migration::*;
use e2e::*;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

const KEY_1: &str = "runtime-protection-key-one-0123456789";
const KEY_2: &str = "runtime-protection-key-two-9876543210";

/// Writes one block after another on one connection until `stop`; counts them and returns the
/// first failure, if any.
fn writer(socket: std::path::PathBuf, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) -> Option<String> {
    let mut c = RawClient::connect(&socket, "", true).expect("connect the writer");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let offset = (16 << 20) + (i % 256) * 4096;
        let block = [(i % 251) as u8; 4096];
        match c.call(request(Cmd::Write, i, offset, 4096), &block) {
            Ok(r) if r.error == 0 => {}
            Ok(r) => return Some(format!("write {i} failed with NBD error {}", r.error)),
            Err(e) => return Some(format!("write {i}: the connection broke: {e}")),
        }
        count.fetch_add(1, Ordering::Relaxed);
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn migrate_to_ready(src: &Host, port: u16) -> Result<Value, String> {
    let mut ctl = src.ctl();
    ctl.execute("migrate-start", json!({"uri": format!("tcp:127.0.0.1:{port}"), "strategy": "row"}))?;
    let start = Instant::now();
    loop {
        let m = ctl.ok("query-migrate", json!({}));
        match m["phase"].as_str() {
            Some("ready") => return Ok(m),
            Some("failed" | "cancelled") => return Err(m["error"].as_str().unwrap_or("?").to_string()),
            _ => {}
        }
        assert!(start.elapsed() < HANG_LIMIT, "no end to the pre-copy: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cancel(src: &Host, dst: &Host) {
    src.ctl().ok("migrate-cancel", json!({}));
    let start = Instant::now();
    while dst.ctl().ok("query-status", json!({}))["incoming-phase"] != "waiting" {
        assert!(start.elapsed() < HANG_LIMIT, "the destination did not go back to waiting");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn protection_is_added_and_rotated_while_a_client_writes() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (image, _) = source_image(src_dir.path(), 31);
    // The source starts with no protection at all: it serves, but cannot migrate.
    let src = source_with(src_dir.path(), &image, &[]);
    let dst_key = key_file(dst_dir.path(), KEY_1);
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let dst = destination(dst_dir.path(), &dst_image, &dst_key, port);

    let (stop, count) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let w = {
        let (socket, stop, count) = (src.server.socket.clone(), stop.clone(), count.clone());
        std::thread::spawn(move || writer(socket, stop, count))
    };

    let status = src.ctl().ok("query-status", json!({}));
    assert!(status["protection"].as_str().unwrap().starts_with("none"), "{status}");
    let refused = migrate_to_ready(&src, port).unwrap_err();
    assert!(refused.contains("--auth-key-file"), "{refused}");

    // A failed reload changes nothing.
    let mut ctl = src.ctl();
    let err = ctl.execute("reload-protection", json!({"auth-key-file": "/nonexistent/key"})).unwrap_err();
    assert!(err.contains("not changed"), "{err}");
    let err = ctl.execute("reload-protection", json!({"auth-key-file": "relative/key"})).unwrap_err();
    assert!(err.contains("absolute path"), "{err}");
    assert!(ctl.ok("query-status", json!({}))["protection"].as_str().unwrap().starts_with("none"));

    // Added at run time: the next migration authenticates.
    let src_key = key_file(src_dir.path(), KEY_1);
    let reply = ctl.ok("reload-protection", json!({"auth-key-file": src_key.to_str().unwrap()}));
    assert_eq!(reply["protection"], "the pre-shared key, sealed records", "{reply}");
    assert_eq!(reply["auth-key-file"], src_key.to_str().unwrap(), "{reply}");
    migrate_to_ready(&src, port).expect("a migration with the key added at run time");
    cancel(&src, &dst);

    // The key rotated on the source only (SIGHUP re-reads the same path): the sides disagree.
    key_file(src_dir.path(), KEY_2);
    signal(src.server.proc.pid(), libc::SIGHUP);
    let start = Instant::now();
    while !src.server.proc.log_text().contains("SIGHUP: protection reloaded") {
        assert!(start.elapsed() < HANG_LIMIT, "no SIGHUP reload in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = migrate_to_ready(&src, port).expect_err("the destination still has the old key");
    eprintln!("with the sides' keys differing: {refused}");
    let start = Instant::now();
    while dst.ctl().ok("query-status", json!({}))["incoming-phase"] != "waiting" {
        assert!(start.elapsed() < HANG_LIMIT, "the destination did not go back to waiting");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then on the destination (its file rewritten, reloaded by the control command).
    key_file(dst_dir.path(), KEY_2);
    let reply = dst.ctl().ok("reload-protection", json!({}));
    assert_eq!(reply["auth-key-file"], dst_key.to_str().unwrap(), "{reply}");
    migrate_to_ready(&src, port).expect("a migration with the rotated key");
    cancel(&src, &dst);

    stop.store(true, Ordering::Relaxed);
    let failure = w.join().unwrap();
    assert_eq!(failure, None, "the NBD client was disturbed");
    let writes = count.load(Ordering::Relaxed);
    assert!(writes > 0, "the writer wrote nothing");
    eprintln!("{writes} writes on one NBD connection through two reloads and three migrations");
}
