//! What an operator meets first, with the real binaries: logging (`RUST_LOG`, `--log-format`,
//! colour, levels), socket mix-ups named at once, image sizes, and units on the command line and
//! the control socket.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e::migration::{destination_with, free_port, key_file, read_all, source, source_image, wait_phase};
use e2e::*;
use serde_json::json;

/// How long a stop may take (the proxy flushes the disk): only a hang fails it.
const STOP: Duration = HANG_LIMIT;
/// What "at once" means for a mixed-up socket: far less than the waits it must not sit through
/// (the NBD server's 10 s negotiation timeout, row-migrate's 30 s connect timeout), with room
/// for a busy machine.
const AT_ONCE: Duration = Duration::from_secs(5);

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `row-migrate` with four sockets and throwaway URIs, its output, and how long it took.
fn row_migrate(sockets: [&Path; 4], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut cmd = Command::new(bin("row-migrate"));
    for (flag, path) in ["--src-qmp", "--dst-qmp", "--src-proxy", "--dst-proxy"].iter().zip(sockets) {
        cmd.arg(flag).arg(path);
    }
    cmd.args(["--disk-uri", "tcp:127.0.0.1:1", "--mem-uri", "tcp:127.0.0.1:2"]);
    cmd.envs(env.iter().copied());
    let started = Instant::now();
    let out = cmd.output().unwrap();
    (out, started.elapsed())
}

#[test]
fn an_invalid_rust_log_is_an_error_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let socket = dir.path().join("nbd.sock");
    let proxy = Command::new(bin("nbd-row-proxy"))
        .args(["serve", "--image"])
        .arg(&image)
        .arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", "nbd_row_proxy=loud")
        .output()
        .unwrap();
    assert_eq!(proxy.status.code(), Some(2), "{}", stderr(&proxy));
    let text = stderr(&proxy);
    assert!(text.starts_with("nbd-row-proxy: invalid RUST_LOG 'nbd_row_proxy=loud': "), "{text}");
    assert_eq!(text.trim_end().lines().count(), 1, "one line: {text}");
    assert!(!socket.exists(), "nothing was started");

    let missing = dir.path().join("missing.sock");
    let (out, _) = row_migrate([&missing, &missing, &missing, &missing], &[("RUST_LOG", "nbd_row_proxy=loud")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("row-migrate: invalid RUST_LOG 'nbd_row_proxy=loud'"), "{}", stderr(&out));
}

#[test]
fn json_logs_are_one_object_per_line_and_text_logs_to_a_file_have_no_colour() {
    require_tool("nbdinfo");
    for format in ["json", "text"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        sparse_file(&image, 1 << 20);
        // The flag is global: it may come after the subcommand too.
        let mut server = Server::start(dir.path(), &image, &["--export", "vm1", "--log-format", format]);
        run_ok(Command::new("nbdinfo").arg(server.uri_of("vm1")));
        assert!(server.proc.terminate(STOP).success());
        let log = server.proc.log_text();
        assert!(!log.contains('\x1b'), "ANSI escapes in a log file: {log:?}");
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{log}");
        if format == "json" {
            for line in &lines {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(v["level"].is_string() && v["message"].is_string() && v["timestamp"].is_string(), "{line}");
            }
            assert!(lines.iter().any(|l| l.contains(r#""message":"connection open""#)), "{log}");
        } else {
            assert!(lines.iter().any(|l| l.contains(" INFO ") && l.contains("connection open")), "{log}");
        }
    }
    // row-migrate, with its stderr in a file: its (debug) log lines carry no colour either.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let other = dir.path().join("other.sock");
    let (out, _) = row_migrate(
        [&missing, &other, &missing.with_extension("a"), &missing.with_extension("b")],
        &[("RUST_LOG", "trace")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!out.stderr.contains(&0x1b), "{}", stderr(&out));
}

#[test]
fn ordinary_clients_leave_no_warning() {
    require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let control = dir.path().join("control.sock");
    let mut server = Server::start(dir.path(), &image, &["--export", "vm1", "--control", control.to_str().unwrap()]);
    run_ok(Command::new("nbdinfo").args(["--list", &server.uri()]));
    run_ok(Command::new("nbdinfo").args(["--list", "--json", &server.uri()]));
    // An export that is not there: the client fails, the server has nothing to warn about.
    let unknown = Command::new("nbdinfo").arg(server.uri_of("nope")).output().unwrap();
    assert!(!unknown.status.success());
    run_ok(Command::new("nbdinfo").arg(server.uri_of("vm1")));
    run_ok(Command::new("nbdinfo").args(["--size", &server.uri_of("vm1")]));
    // A client that hangs up after the greeting, and one that hangs up mid-negotiation.
    drop(std::os::unix::net::UnixStream::connect(&server.socket).unwrap());
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&[0, 0, 0, 3, b'I', b'H']).unwrap();
    }
    // The control socket: connect and leave.
    drop(ControlClient::connect(&control));
    std::thread::sleep(Duration::from_millis(200));
    assert!(server.proc.terminate(STOP).success());
    let log = server.proc.log_text();
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");
}

#[test]
fn sockets_mixed_up_are_named_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let key = key_file(dir.path(), "0123456789abcdef0123456789abcdef");
    let host = source(dir.path(), &image, &key);
    let nbd = host.server.socket.as_path();
    let control = host.control.as_path();
    let (dst_qmp, dst_proxy) = (dir.path().join("dst-qmp.sock"), dir.path().join("dst.ctl"));

    // The proxy's NBD socket given as QEMU's QMP socket.
    let (out, took) = row_migrate([nbd, &dst_qmp, control, &dst_proxy], &[]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(took < AT_ONCE, "took {took:?}: {text}");
    assert!(text.contains("--src-qmp") && text.contains("NBD server's socket"), "{text}");

    // The proxy's control socket given as QEMU's QMP socket.
    let (out, took) = row_migrate([control, &dst_qmp, nbd, &dst_proxy], &[]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(took < AT_ONCE, "took {took:?}: {text}");
    assert!(text.contains("--src-qmp") && text.contains("it is an nbd-row-proxy control socket"), "{text}");

    // The same socket twice.
    let (out, took) = row_migrate([nbd, nbd, control, &dst_proxy], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(took < AT_ONCE, "took {took:?}");
    assert!(stderr(&out).contains("--src-qmp and --dst-qmp are the same socket"), "{}", stderr(&out));

    // The reverse: QEMU's QMP socket given as a proxy's control socket.
    require_tool("qemu-system-x86_64");
    let qmp = dir.path().join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let mut qemu = Proc::spawn(
        "qemu",
        Command::new("qemu-system-x86_64").args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            &qmp_arg,
        ]),
        &dir.path().join("qemu.log"),
    );
    qemu.wait_for_socket(&qmp);
    // (wait_for_socket's probe connection is gone by now; QEMU serves one client at a time.)
    std::thread::sleep(Duration::from_millis(200));
    // --recover takes components that do not answer as gone, and refuses a wrong one at once.
    let fake_src_qmp = dir.path().join("src-qmp.sock");
    let out = Command::new(bin("row-migrate"))
        .arg("--src-qmp")
        .arg(&fake_src_qmp)
        .arg("--dst-qmp")
        .arg(&dst_qmp)
        .arg("--src-proxy")
        .arg(&qmp)
        .arg("--dst-proxy")
        .arg(&dst_proxy)
        .arg("--recover")
        .output()
        .unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("--src-proxy") && text.contains("it is QEMU's QMP socket"), "{text}");
    qemu.terminate(STOP);
}

#[test]
fn an_image_smaller_than_a_block_is_refused_and_an_odd_size_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    for size in [0, 1000, 4095] {
        let image = dir.path().join(format!("tiny-{size}.raw"));
        sparse_file(&image, size);
        let socket = dir.path().join("nbd.sock");
        let out = Command::new(bin("nbd-row-proxy"))
            .args(["serve", "--image"])
            .arg(&image)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        let text = stderr(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains(&format!("is {size} bytes, smaller than one 4 KiB block")), "{text}");
        assert!(!socket.exists(), "no socket left behind");
    }
    for (size, says) in [((1 << 20) + 512, "not a whole number of 4 KiB blocks"), ((1 << 20) + 100, "512-byte sectors")]
    {
        let sub = dir.path().join(format!("odd-{size}"));
        std::fs::create_dir(&sub).unwrap();
        let image = sub.join("disk.raw");
        sparse_file(&image, size);
        let mut server = Server::start(&sub, &image, &[]);
        assert!(server.proc.terminate(STOP).success());
        let log = server.proc.log_text();
        assert!(log.lines().any(|l| l.contains(" WARN ") && l.contains(says)), "{log}");
    }
}

#[test]
fn units_on_the_command_line_and_the_control_socket() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let (src_image, data) = source_image(src_dir.path(), 21);
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, data.len() as u64);
    let key = key_file(src_dir.path(), "0123456789abcdef0123456789abcdef");
    let port = free_port();
    let src = source(src_dir.path(), &src_image, &key);
    // `--read-wait 2` keeps meaning two seconds.
    let dst = destination_with(
        dst_dir.path(),
        &dst_image,
        &["--auth-key-file", key.to_str().unwrap(), "--read-wait", "2"],
        port,
    );
    let mut ctl = src.ctl();
    let uri = format!("tcp:127.0.0.1:{port}");
    let e = ctl.execute("migrate-start", json!({"uri": uri, "max-bandwidth": "10 parsecs"})).unwrap_err();
    assert!(e.contains("invalid value '10 parsecs': expected a rate like 100mbit, 12MiB/s or bytes per second"), "{e}");
    let e = ctl.execute("migrate-start", json!({"uri": uri, "final-budget-ms": "soon"})).unwrap_err();
    assert!(e.contains("expected a duration"), "{e}");
    ctl.ok("migrate-start", json!({"uri": uri, "max-bandwidth": "100MiB", "final-budget-ms": "2s"}));
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over");
    ctl.ok("migrate-complete", json!({}));
    assert!(read_all(&dst.server) == data);

    // The bitmap strategy's granularity as a size with a unit.
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src_image, data) = source_image(src_dir.path(), 22);
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, data.len() as u64);
    let key = key_file(src_dir.path(), "0123456789abcdef0123456789abcdef");
    let port = free_port();
    let src = source(src_dir.path(), &src_image, &key);
    let dst = destination_with(
        dst_dir.path(),
        &dst_image,
        &["--auth-key-file", key.to_str().unwrap(), "--read-wait", "500ms"],
        port,
    );
    let mut ctl = src.ctl();
    let uri = format!("tcp:127.0.0.1:{port}");
    ctl.ok(
        "migrate-start",
        json!({"uri": uri, "strategy": "bitmap", "bitmap-granularity": "64KiB", "max-bandwidth": "1gbit"}),
    );
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over");
    ctl.ok("migrate-complete", json!({}));
    assert!(read_all(&dst.server) == data);

    // A bad unit on the command line: one line, status 2, nothing started.
    let out = Command::new(bin("nbd-row-proxy"))
        .args(["receive", "--listen", "127.0.0.1:1", "--image"])
        .arg(&dst_image)
        .args(["--socket", "/nonexistent/x.sock", "--read-wait", "10 parsecs"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with(
        "error: invalid value '10 parsecs' for '--read-wait <DURATION>': expected a duration like 500ms, 2s or 1h30m, or a number of seconds"
    ), "{}", stderr(&out));
}
