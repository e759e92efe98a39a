//! A disk's life cycle across hosts, with the real binaries:
//! - a disk goes A → B → A → B, with distinct writes at every stop, `retire` where an operator
//!   would run it, a retired image received into again and one deleted and created again by
//!   `receive --create`; every byte is checked at the end;
//! - `serve` of a disk migrated away for good refuses with one line (exit 1) that names the
//!   destination, except `--read-only` and `--fenced`; a source whose post-copy is still pushing
//!   starts after a restart (its destination still reads from it) and is retired only after;
//! - `retire` refuses, with one line, what it must not drop; `receive` explains a missing image
//!   and creates one with `--create`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use control_api::{MigrateFinishArgs, NoArgs, PostcopyMode, QueryMigrate, QueryStatus};
use e2e::migration::*;
use e2e::*;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

const KEY: &str = "life-cycle-test-key-0123456789abcdef";

/// `nbd-row-proxy ARGS` run to completion, with the rig's state directory for `image`.
fn proxy(image: &Path, args: &[&str]) -> Output {
    Command::new(bin("nbd-row-proxy"))
        .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(image))
        .env("RUST_LOG", "info")
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `nbd-row-proxy retire --image IMAGE EXTRA...`, which must succeed; its stdout.
fn retire(image: &Path, extra: &[&str]) -> String {
    let mut args = vec!["retire", "--image", image.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = proxy(image, &args);
    assert!(out.status.success(), "retire {}: {}", image.display(), text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("removed ") && stdout.contains("retired disk"), "{stdout}");
    assert!(!state_dir_of(image).read_dir().unwrap().any(|_| true), "the state entry is left: {stdout}");
    stdout
}

/// A refusal: exit 1 and exactly one line on stderr, which contains every one of `words`.
fn refused(out: &Output, words: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "not refused (exit 1): {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "more than one line:\n{err}");
    for w in words {
        assert!(err.contains(w), "{w:?} missing from: {err}");
    }
    err
}

/// `serve --image IMAGE` in `dir` (with a control socket), which must refuse to start.
fn serve_refused(dir: &Path, image: &Path, words: &[&str]) -> String {
    let sock = dir.join("refused.sock");
    let ctl = dir.join("refused.ctl");
    let out = proxy(
        image,
        &[
            "serve",
            "--image",
            image.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    let err = refused(&out, words);
    assert!(!sock.exists() && !ctl.exists(), "a refused start left a socket");
    err
}

/// Writes `data` at `offset` through `host`'s NBD socket (and flushes); the NBD error.
fn write(host: &Host, offset: usize, data: &[u8]) -> u32 {
    let mut c = RawClient::connect(&host.server.socket, "", true).unwrap();
    let error = c.call(request(Cmd::Write, 1, offset as u64, data.len() as u32), data).unwrap().error;
    if error == 0 {
        assert_eq!(c.call(request(Cmd::Flush, 2, 0, 0), &[]).unwrap().error, 0, "flush");
    }
    error
}

/// A stop's own writes: `blocks` blocks of data seeded by `seed` spread over the disk (one in
/// the source image's hole, one partial), applied to `model`.
fn write_stop(host: &Host, model: &mut [u8], seed: u64) {
    let spots = [(seed as usize * 37) % 2000, 2500, 3000 + seed as usize, (10 << 20) / BS + seed as usize, 7000];
    for (i, block) in spots.into_iter().enumerate() {
        let data = random_bytes(seed * 100 + i as u64, BS);
        assert_eq!(write(host, block * BS, &data), 0, "write at block {block}");
        model[block * BS..(block + 1) * BS].copy_from_slice(&data);
    }
    let part = random_bytes(seed * 100 + 99, 512);
    let at = 4000 * BS + 1024;
    assert_eq!(write(host, at, &part), 0);
    model[at..at + 512].copy_from_slice(&part);
}

/// Migrates `src`'s disk to the `receive` proxy on `port` (strategy row), writing `model`'s
/// changes of `seed` while pre-copy runs (they land in the overlay), and completes it; returns
/// the session id.
fn migrate(src: &Host, port: u16, model: &mut [u8], seed: u64) -> String {
    let mut ctl = src.ctl();
    let started = ctl.ok("migrate-start", json!({"uri": format!("tcp:127.0.0.1:{port}"), "strategy": "row"}));
    write_stop(src, model, seed);
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over");
    ctl.ok("migrate-complete", json!({}));
    assert_eq!(ctl.ok("query-migrate", json!({}))["phase"], "completed");
    started["session"].as_str().unwrap().to_string()
}

fn status(host: &Host) -> Value {
    host.ctl().ok("query-status", json!({}))
}

#[test]
fn a_disk_goes_a_b_a_b_with_retire_where_an_operator_would_and_keeps_every_byte() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let key = key_file(a_dir.path(), KEY);
    let (image_a, mut model) = source_image(a_dir.path(), 41);
    let image_b = b_dir.path().join("disk.raw");
    sparse_file(&image_b, SIZE as u64);

    // A → B.
    let mut a = source(a_dir.path(), &image_a, &key);
    write_stop(&a, &mut model, 1);
    let port_b = free_port();
    let b = destination(b_dir.path(), &image_b, &key, port_b);
    let session = migrate(&a, port_b, &mut model, 2);
    assert!(read_all(&b.server) == model, "B after A → B");
    a.server.proc.terminate(HANG_LIMIT);
    // A's copy is out of date: serving it is refused, with where the disk went.
    serve_refused(a_dir.path(), &image_a, &[&format!("tcp:127.0.0.1:{port_b}"), &session, "retire"]);
    // The operator retires it: its overlay is merged, so the image is the disk as handed over.
    let out = retire(&image_a, &[]);
    assert!(out.contains(&format!("tcp:127.0.0.1:{port_b}")), "{out}");

    // B runs the guest: its own writes.
    write_stop(&b, &mut model, 3);
    // B → A: B's proxy is the source now, A receives into its retired image.
    let port_a = free_port();
    a = destination(a_dir.path(), &image_a, &key, port_a);
    assert_eq!(status(&a)["incoming-phase"], "waiting", "the retired image waits for the disk");
    migrate(&b, port_a, &mut model, 4);
    assert!(read_all(&a.server) == model, "A after B → A");
    drop(b);
    serve_refused(b_dir.path(), &image_b, &[&format!("tcp:127.0.0.1:{port_a}")]);
    // This time B's image goes too, and `receive --create` makes a new one.
    retire(&image_b, &["--delete-image"]);
    assert!(!image_b.exists());

    // A runs the guest, then A → B into the created image.
    write_stop(&a, &mut model, 5);
    let port_b = free_port();
    let size = SIZE.to_string();
    let b = destination_with(
        b_dir.path(),
        &image_b,
        &["--auth-key-file", key.to_str().unwrap(), "--create", &size],
        port_b,
    );
    assert_eq!(std::fs::metadata(&image_b).unwrap().len(), SIZE as u64);
    migrate(&a, port_b, &mut model, 6);
    write_stop(&b, &mut model, 7);

    // Every byte of every stop, through B's proxy and in its image.
    assert!(read_all(&b.server) == model, "B after A → B → A → B");
    drop(b);
    assert!(std::fs::read(&image_b).unwrap() == model, "B's image after A → B → A → B");
    // A's last copy is refused and retired in turn.
    a.server.proc.terminate(HANG_LIMIT);
    serve_refused(a_dir.path(), &image_a, &[&format!("tcp:127.0.0.1:{port_b}")]);
    retire(&image_a, &[]);
}

#[test]
fn a_disk_migrated_away_is_served_only_read_only_or_fenced() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let key = key_file(a_dir.path(), KEY);
    let (image_a, mut model) = source_image(a_dir.path(), 42);
    let image_b = b_dir.path().join("disk.raw");
    sparse_file(&image_b, SIZE as u64);
    let a = source(a_dir.path(), &image_a, &key);
    let port = free_port();
    let b = destination(b_dir.path(), &image_b, &key, port);
    let session = migrate(&a, port, &mut model, 1);
    let since = status(&a)["fence"]["since"].as_str().unwrap().to_string();
    drop(a);
    let peer = format!("tcp:127.0.0.1:{port}");
    serve_refused(
        a_dir.path(),
        &image_a,
        &[&peer, &session, &since, "--read-only", "nbd-row-proxy retire --image", "--fenced", "reclaim"],
    );

    // --read-only: the disk as handed over (its ROW overlay replayed), writes refused.
    let ro = Server::start(a_dir.path(), &image_a, &["--read-only"]);
    assert!(read_all(&ro) == model, "the disk as handed over");
    let mut c = RawClient::connect(&ro.socket, "", true).unwrap();
    assert_ne!(c.flags & nbd_proto::consts::NBD_FLAG_READ_ONLY, 0, "exported read-only");
    assert_ne!(c.call(request(Cmd::Write, 1, 0, 4096), &[1; 4096]).unwrap().error, 0, "a write went through");
    drop(c);
    let log = ro.proc.log_text();
    assert!(log.contains("WARN") && log.contains(&format!("was migrated to {peer}")), "{log}");
    drop(ro);

    // --fenced: served as before, and an operator can take it back by force.
    let control = a_dir.path().join("fenced.ctl");
    let mut server = Server::start(a_dir.path(), &image_a, &["--fenced", "--control", control.to_str().unwrap()]);
    server.proc.wait_for_socket(&control);
    let fenced = Host { server, control, image: image_a.clone() };
    assert_eq!(write(&fenced, 0, &[1; 4096]), nbd_proto::consts::NBD_EPERM);
    let s = status(&fenced);
    assert_eq!(s["fence"]["phase"], "completed", "{s}");
    assert_eq!(s["fence"]["peer"], peer.as_str(), "{s}");
    // Retiring it needs the proxy stopped.
    let out = proxy(&image_a, &["retire", "--image", image_a.to_str().unwrap()]);
    refused(&out, &["served right now"]);
    fenced.ctl().ok("reclaim", json!({"force": true}));
    assert_eq!(write(&fenced, 0, &[1; 4096]), 0, "reclaimed");
    drop(fenced);
    // Reclaimed, it is this host's own disk again: served, and nothing to retire.
    let out = proxy(&image_a, &["retire", "--image", image_a.to_str().unwrap()]);
    refused(&out, &["owns disk", "nothing to retire"]);
    let again = Server::start(a_dir.path(), &image_a, &[]);
    drop(again);
    drop(b);
}

#[test]
fn retire_refuses_what_it_must_not_drop() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let key = key_file(a_dir.path(), KEY);
    let (image_a, _) = source_image(a_dir.path(), 43);
    let retire_of = |image: &Path| proxy(image, &["retire", "--image", image.to_str().unwrap()]);

    // An image never served has no state; it is not tagged by asking.
    refused(&retire_of(&image_a), &["never served"]);
    assert!(xattr::get(&image_a, "user.nbd-row-proxy.disk-id").unwrap().is_none());
    let a = source(a_dir.path(), &image_a, &key);
    // A disk that owns itself.
    refused(&retire_of(&image_a), &["owns disk", "nothing to retire"]);
    let image_b = b_dir.path().join("disk.raw");
    sparse_file(&image_b, SIZE as u64);
    let port = free_port();
    let b = destination(b_dir.path(), &image_b, &key, port);
    // A hand-over that is not over (handed over, not completed).
    let mut ctl = a.ctl();
    ctl.ok("migrate-start", json!({"uri": format!("tcp:127.0.0.1:{port}"), "strategy": "row"}));
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over");
    drop(ctl);
    drop(a);
    refused(&retire_of(&image_a), &["not over", "handed-over", "--recover"]);
    // It still starts (the hand-over is resolved through it), and receive refuses to overwrite it.
    let a = source(a_dir.path(), &image_a, &key);
    assert_eq!(write(&a, 0, &[1; 4096]), nbd_proto::consts::NBD_EPERM);
    drop(a);
    let sock = a_dir.path().join("r.sock");
    let out = proxy(
        &image_a,
        &[
            "receive",
            "--image",
            image_a.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--insecure",
        ],
    );
    refused(&out, &["not over", &format!("tcp:127.0.0.1:{port}"), "--recover"]);

    // The destination received the disk: it owns it.
    drop(b);
    refused(&retire_of(&image_b), &["owns it", "received"]);
    // A block device is never deleted.
    require_tool("losetup");
    let out = Command::new("losetup").args(["--find", "--show"]).arg(&image_b).output().unwrap();
    assert!(out.status.success(), "losetup: {}", text(&out.stderr));
    let dev = PathBuf::from(text(&out.stdout).trim());
    let del = proxy(&image_b, &["retire", "--image", dev.to_str().unwrap(), "--delete-image"]);
    let _ = Command::new("losetup").arg("--detach").arg(&dev).status();
    refused(&del, &["block device"]);
}

#[test]
fn receive_explains_a_missing_image_and_creates_one_with_create() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("nbd.sock");
    let receive = |extra: &[&str]| {
        let mut args = vec![
            "receive",
            "--image",
            image.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--auth-key-file",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        proxy(&image, &args)
    };
    refused(&receive(&[]), &["does not exist", "truncate -s", "--create", "image-size"]);
    assert!(!image.exists());
    let bad = receive(&["--create", "10 parsecs"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    refused(&receive(&["--create", "100"]), &["at least one"]);
    sparse_file(&image, 1 << 20);
    refused(&receive(&["--create", "2MiB"]), &["exists with 1048576 bytes", "2097152"]);
    std::fs::remove_file(&image).unwrap();

    // Created at the size asked for, sparse, mode 0600; a restart with the same flag reuses it.
    let port = free_port();
    let args = ["--auth-key-file", key.to_str().unwrap(), "--create", "32MiB"];
    let dst = destination_with(dir.path(), &image, &args, port);
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 32 << 20);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.blocks(), 0, "sparse");
    assert_eq!(status(&dst)["incoming-phase"], "waiting");
    drop(dst);
    let dst = destination_with(dir.path(), &image, &args, port);
    assert_eq!(status(&dst)["incoming-phase"], "waiting");
}

/// `serve` of `image` in `dir` with `env` set for it (e.g. a test pause).
fn source_with_env(dir: &Path, image: &Path, key: &Path, env: &[(&str, &str)]) -> Host {
    let socket = dir.join("nbd.sock");
    let control = dir.join("control.sock");
    let mut cmd = Command::new(bin("nbd-row-proxy"));
    cmd.arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(&socket)
        .arg("--control")
        .arg(&control)
        .arg("--auth-key-file")
        .arg(key)
        .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(image))
        .env("RUST_LOG", "info")
        .envs(env.iter().copied());
    let mut proc = Proc::spawn("nbd-row-proxy", &mut cmd, &dir.join("server.log"));
    proc.wait_for_socket(&socket);
    proc.wait_for_socket(&control);
    Host { server: Server { proc, socket }, control, image: image.to_owned() }
}

#[test]
fn a_source_still_pushing_its_post_copy_restarts_and_is_retired_only_once_it_is_done() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let key = key_file(a_dir.path(), KEY);
    let (image_a, mut model) = source_image(a_dir.path(), 44);
    let image_b = b_dir.path().join("disk.raw");
    sparse_file(&image_b, SIZE as u64);
    // The push is held back long enough for the source to be killed before it ends.
    let a = source_with_env(a_dir.path(), &image_a, &key, &[(control_api::PAUSE_VAR, "postcopy-push:600000")]);
    let port = free_port();
    let b = destination(b_dir.path(), &image_b, &key, port);
    let mut ctl = a.ctl();
    ctl.ok("migrate-start", json!({"uri": format!("tcp:127.0.0.1:{port}"), "strategy": "row"}));
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    // Written after pre-copy: left to the post-copy.
    write_stop(&a, &mut model, 1);
    let args = MigrateFinishArgs { postcopy: Some(PostcopyMode::Always), budget_ms: None };
    let finished = ctl.call::<control_api::MigrateFinish>(args).expect("migrate-finish");
    assert!(finished.postcopy.as_ref().is_some_and(|p| p.blocks > 0), "{finished:?}");
    let e = ctl.execute("migrate-complete", json!({})).unwrap_err();
    assert!(e.contains("post-copy is still running"), "{e}");
    drop(ctl);
    let mut a = a;
    a.server.proc.wait_or_kill(Duration::ZERO);

    // B still reads blocks from A: nothing may drop or overwrite A's copy.
    let retire_of = proxy(&image_a, &["retire", "--image", image_a.to_str().unwrap()]);
    refused(&retire_of, &["post-copy", "still running"]);
    let sock = a_dir.path().join("r.sock");
    let out = proxy(
        &image_a,
        &[
            "receive",
            "--image",
            image_a.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--insecure",
        ],
    );
    refused(&out, &["post-copy still pushing"]);
    // A plain `serve` starts (not refused), fenced, and resumes the push.
    let a = source(a_dir.path(), &image_a, &key);
    let mut ctl = a.ctl();
    assert!(ctl.call::<QueryStatus>(NoArgs {}).unwrap().fence.is_some());
    let started = Instant::now();
    loop {
        let s = ctl.call::<QueryMigrate>(NoArgs {}).unwrap();
        if s.postcopy.as_ref().is_some_and(|p| p.done) {
            break;
        }
        assert!(started.elapsed() < HANG_LIMIT, "the post-copy did not finish: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    ctl.ok("migrate-complete", json!({}));
    assert!(read_all(&b.server) == model, "every block arrived");
    drop(ctl);
    drop(a);
    // Now it is over: refused as a disk migrated away, and retired.
    serve_refused(a_dir.path(), &image_a, &[&format!("tcp:127.0.0.1:{port}")]);
    retire(&image_a, &["--delete-image"]);
    assert!(!image_a.exists());
    drop(b);
}
