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
        .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&image))
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
            .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&image))
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
        .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&dst_image))
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

/// The five files of a lab PKI, as `tls-certs` writes them.
const PKI_FILES: [&str; 5] = ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"];

fn tls_certs(dir: &Path, extra: &[&str]) -> Output {
    Command::new(bin("nbd-row-proxy"))
        .args(["tls-certs", "--dir"])
        .arg(dir)
        .args(["--host", "127.0.0.1"])
        .args(extra)
        .output()
        .unwrap()
}

/// Every file in `dir` and its content, sorted by name.
fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn tls_certs_never_replaces_a_file_and_force_keeps_backups() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = tls_certs(&pki, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = files_in(&pki);
    assert_eq!(first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), {
        let mut names = PKI_FILES.to_vec();
        names.sort();
        names
    });

    // Again: refused in one line naming every file there, status 2, nothing touched.
    let out = tls_certs(&pki, &[]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(text.trim_end().lines().count(), 1, "one line: {text}");
    assert!(text.contains("--force"), "{text}");
    for name in PKI_FILES {
        assert!(text.contains(name), "{name} not named: {text}");
    }
    assert!(files_in(&pki) == first, "an existing PKI was changed");

    // A site's own CA alone (e.g. /etc/pki/qemu with libvirt's): refused too, and no file is
    // added beside it.
    let site = dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("ca-cert.pem"), "the site's CA").unwrap();
    let out = tls_certs(&site, &[]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("ca-cert.pem") && !text.contains("server-key.pem"), "{text}");
    assert_eq!(files_in(&site), vec![("ca-cert.pem".to_string(), b"the site's CA".to_vec())]);

    // --force: each file is first renamed to NAME.bak-<unix-seconds>, and says so.
    let out = tls_certs(&pki, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = files_in(&pki);
    for (name, old) in &first {
        let backups: Vec<&(String, Vec<u8>)> =
            after.iter().filter(|(n, _)| n.starts_with(&format!("{name}.bak-"))).collect();
        assert_eq!(backups.len(), 1, "{name}: {after:?}");
        let (backup, kept) = backups[0];
        let stamp: u64 = backup[name.len() + 5..].parse().unwrap_or_else(|_| panic!("{backup}"));
        assert!(stamp > 1_600_000_000, "{backup}");
        assert!(kept == old, "{backup} does not hold the old {name}");
        assert!(
            said.contains(&format!("moved {}", pki.join(name).display())) && said.contains(backup.as_str()),
            "{said}"
        );
        let new = &after.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(new != old, "{name} was not replaced");
        let mode = std::fs::metadata(pki.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, if name.ends_with("-key.pem") { 0o600 } else { 0o644 }, "{name}");
    }
    // Twice within a second or not, no backup is ever overwritten: every version is kept.
    let second = files_in(&pki);
    let out = tls_certs(&pki, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let third = files_in(&pki);
    assert_eq!(third.len(), 15, "{:?}", third.iter().map(|(n, _)| n).collect::<Vec<_>>());
    for (name, content) in first.iter().chain(&second) {
        assert!(
            third.iter().any(|(n, c)| n.starts_with(name.as_str()) && c == content),
            "a version of {name} was lost"
        );
    }
    // The newest files make a working PKI.
    let creds = nbd_row_proxy::tls::TlsCreds::load(&pki).unwrap();
    creds.acceptor().unwrap();
    creds.connector().unwrap();
}

#[test]
fn sockets_have_their_modes_whatever_the_umask() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let (socket, control) = (dir.path().join("nbd.sock"), dir.path().join("ctl.sock"));
    let mut cmd = Command::new(bin("nbd-row-proxy"));
    cmd.args(["serve", "--image"]).arg(&image).arg("--socket").arg(&socket).arg("--control").arg(&control);
    cmd.env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&image));
    // SAFETY: umask(2) is async-signal-safe and touches nothing but the child's mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut proc = Proc::spawn("nbd-row-proxy", &mut cmd, &dir.path().join("server.log"));
    proc.wait_for_socket(&control);
    for (path, want) in [(&socket, 0o660), (&control, 0o600)] {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, want, "{} under umask 000", path.display());
    }
    // The proxy creates its other files as before: the disk is still served.
    ControlClient::connect(&control).ok("query-status", json!({}));
    assert!(proc.terminate(STOP).success());
}

#[test]
fn an_ownership_record_that_is_a_directory_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let record = state_dir_of(&image).join("vm1-root").join("ownership");
    std::fs::create_dir_all(&record).unwrap();
    let socket = dir.path().join("nbd.sock");
    let out = Command::new(bin("nbd-row-proxy"))
        .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&image))
        .env("RUST_LOG", "warn")
        .args(["serve", "--disk-id", "vm1-root", "--image"])
        .arg(&image)
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    let text = stderr(&out);
    // An error it reports (status 1), not an abort (134) on a huge allocation.
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.trim_end().lines().count(), 1, "one line: {text}");
    assert!(text.contains(&record.display().to_string()) && text.contains("is a directory"), "{text}");
    assert!(!socket.exists(), "nothing was started");
    assert!(record.is_dir(), "the directory is left alone");
}

#[test]
fn numbers_out_of_range_on_the_control_socket_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let key = key_file(dir.path(), "0123456789abcdef0123456789abcdef");
    let host = source(dir.path(), &image, &key);
    let mut ctl = host.ctl();
    let idle = ctl.ok("query-migrate", json!({}));
    // Nothing listens there: a refusal must come from the arguments, before any connection.
    let uri = "tcp:127.0.0.1:1";
    for (args, says) in [
        (json!({"uri": uri, "max-bandwidth": "1bit"}), "max-bandwidth is 0 bytes/s"),
        (json!({"uri": uri, "max-bandwidth": 0}), "leave it out for no limit"),
        (json!({"uri": uri, "rounds": 0}), "rounds 0 is out of range: 1 to 100"),
        (json!({"uri": uri, "rounds": 1000}), "rounds 1000 is out of range"),
        (
            json!({"uri": uri, "strategy": "bitmap", "bitmap-granularity": 0}),
            "bitmap-granularity 0 bytes is not a power of two from 4 KiB to 1 GiB",
        ),
        (json!({"uri": uri, "strategy": "bitmap", "bitmap-granularity": 3}), "bitmap-granularity 3 bytes"),
        (json!({"uri": uri, "strategy": "bitmap", "bitmap-granularity": "6KiB"}), "bitmap-granularity 6144 bytes"),
        (json!({"uri": uri, "strategy": "bitmap", "bitmap-granularity": "4GiB"}), "to 1 GiB"),
        (json!({"uri": uri, "final-budget-ms": "30d"}), "final-budget-ms 2592000000 is out of range"),
        (json!({"uri": uri, "hot-threshold": 0}), "hot-threshold 0 is out of range"),
        (json!({"uri": uri, "hot-threshold": 128}), "hot-threshold 128 is out of range"),
        (json!({"uri": uri, "rounds": -1}), "invalid value"),
    ] {
        let e = ctl.execute("migrate-start", args.clone()).unwrap_err();
        assert!(e.contains(says), "{args}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    let e = ctl.execute("migrate-finish", json!({"budget-ms": "2d"})).unwrap_err();
    assert!(e.contains("budget-ms 172800000 is out of range"), "{e}");
    let e = ctl.execute("query-row", json!({"hot-threshold": 0})).unwrap_err();
    assert!(e.contains("hot-threshold 0 is out of range"), "{e}");
    // None of them started anything.
    assert_eq!(ctl.ok("query-migrate", json!({})), idle);
    // The smallest values in range are taken.
    ctl.ok("query-row", json!({"hot-threshold": 1}));
}

/// What bash offers for `words` (the last one being completed) with the completion script of
/// `name` that `--generate-docs` writes, run in a real bash the way bash runs it on TAB.
fn bash_complete(script: &Path, name: &str, words: &[&str]) -> Vec<String> {
    let function = format!("_{}", name.replace('-', "__"));
    let shell = format!(
        r#"source "$1" || exit 9
shift
COMP_WORDS=("$@")
COMP_CWORD=$(( $# - 1 ))
COMP_LINE="$*"
COMP_POINT=${{#COMP_LINE}}
prev=""
(( COMP_CWORD > 0 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
{function} "{name}" "${{COMP_WORDS[COMP_CWORD]}}" "$prev"
printf '%s\n' "${{COMPREPLY[@]}}""#
    );
    let out =
        run_ok(Command::new("bash").args(["--norc", "--noprofile", "-c", &shell, "bash"]).arg(script).args(words));
    String::from_utf8(out.stdout).unwrap().lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// The generated bash completion completes subcommands and each subcommand's own flags (the
/// script clap_complete writes for a name with a dash labelled the subcommands' cases so that
/// none matched, and nothing was offered after a subcommand).
#[test]
fn bash_completes_the_subcommands_and_their_flags() {
    require_tool("bash");
    let out = tempfile::tempdir().unwrap();
    run_ok(Command::new(bin("nbd-row-proxy")).arg("--generate-docs").arg(out.path()));
    let script = out.path().join("completions/bash/nbd-row-proxy");
    let has = |got: &[String], want: &[&str], line: &str| {
        for w in want {
            assert!(got.iter().any(|g| g == w), "`{line}<TAB>` offers {got:?}, not {w}");
        }
    };
    let top = bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", ""]);
    has(&top, &["serve", "receive", "tls-certs", "retire"], "nbd-row-proxy ");
    assert_eq!(bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "rec"]), ["receive"]);
    assert_eq!(bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "ret"]), ["retire"]);
    let retire = bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "retire", "--"]);
    has(&retire, &["--image", "--state-dir", "--disk-id", "--delete-image"], "nbd-row-proxy retire --");
    let serve = bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "serve", "--fe"]);
    assert_eq!(serve, ["--fenced"], "nbd-row-proxy serve --fe<TAB>");
    let receive = bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "receive", "--cr"]);
    assert_eq!(receive, ["--create"], "nbd-row-proxy receive --cr<TAB>");
    let serve = bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "serve", "--"]);
    has(&serve, &["--image", "--socket", "--control", "--tls-creds"], "nbd-row-proxy serve --");
    assert!(!serve.iter().any(|f| f == "--listen"), "serve offers receive's --listen: {serve:?}");
    let receive = bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "receive", "--li"]);
    assert_eq!(receive, ["--listen"], "nbd-row-proxy receive --li<TAB>");
    let certs = bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "tls-certs", "--"]);
    has(&certs, &["--dir", "--host", "--force"], "nbd-row-proxy tls-certs --");
    let logs = bash_complete(&script, "nbd-row-proxy", &["nbd-row-proxy", "serve", "--log-format", ""]);
    assert_eq!(logs, ["text", "json"]);

    // row-migrate has no subcommands: its flags, and the values of its enums.
    run_ok(Command::new(bin("row-migrate")).arg("--generate-docs").arg(out.path()));
    let script = out.path().join("completions/bash/row-migrate");
    let flags = bash_complete(&script, "row-migrate", &["row-migrate", "--mem"]);
    assert_eq!(flags, ["--mem-uri"]);
    let strategies = bash_complete(&script, "row-migrate", &["row-migrate", "--strategy", ""]);
    assert_eq!(strategies, ["row", "bitmap", "qemu-mirror"]);
}

/// `row-migrate --help` and a usage error show every flag a migration needs, --mem-uri too.
#[test]
fn row_migrate_usage_names_the_required_mem_uri() {
    let help = String::from_utf8(run_ok(Command::new(bin("row-migrate")).arg("--help")).stdout).unwrap();
    let usage: Vec<&str> = help.lines().skip_while(|l| !l.starts_with("Usage:")).take(2).collect();
    assert!(usage[0].contains("--src-qmp") && usage[0].contains("--mem-uri <MEM_URI>"), "{help}");
    assert!(usage[0].contains("--disk-uri") && usage[0].contains("--disk <SRC,DST,URI>"), "{help}");
    assert!(usage[1].contains("--recover") && !usage[1].contains("--mem-uri"), "{help}");
    let out = Command::new(bin("row-migrate")).args(["--src-qmp", "a", "--dst-qmp", "b"]).output().unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("the following required arguments were not provided") && text.contains("--mem-uri"),
        "{text}"
    );
    // --recover needs no --mem-uri.
    let out = Command::new(bin("row-migrate"))
        .args(["--src-qmp", "/nonexistent/a", "--dst-qmp", "/nonexistent/b", "--recover"])
        .args(["--src-proxy", "/nonexistent/c", "--dst-proxy", "/nonexistent/d"])
        .output()
        .unwrap();
    assert!(!stderr(&out).contains("required arguments"), "{}", stderr(&out));
}

/// A QEMU with no machine (nothing to boot), its QMP socket ready: `incoming` waits for a
/// migration (`-incoming defer`).
fn bare_qemu(dir: &Path, name: &str, incoming: bool) -> (Proc, std::path::PathBuf) {
    let qmp = dir.join(format!("{name}.qmp"));
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "none", "-nodefaults", "-display", "none", "-qmp", &qmp_arg]);
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    let mut qemu = Proc::spawn(name, &mut cmd, &dir.join(format!("{name}.log")));
    qemu.wait_for_socket(&qmp);
    std::thread::sleep(Duration::from_millis(200));
    (qemu, qmp)
}

#[test]
fn proxies_protected_differently_are_refused_before_anything_starts() {
    require_tool("qemu-system-x86_64");
    let dir = tempfile::tempdir().unwrap();
    let (src_dir, dst_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let (image, _) = source_image(&src_dir, 41);
    let key = key_file(&src_dir, "0123456789abcdef0123456789abcdef");
    let src = source(&src_dir, &image, &key);
    let pki = lab_pki(&dir.path().join("pki"));
    let dst_image = dst_dir.join("disk.raw");
    sparse_file(&dst_image, std::fs::metadata(&image).unwrap().len());
    let dst = destination_with(&dst_dir, &dst_image, &["--tls-creds", pki.to_str().unwrap()], free_port());
    let (mut a, src_qmp) = bare_qemu(dir.path(), "qemu-a", false);
    let (mut b, dst_qmp) = bare_qemu(dir.path(), "qemu-b", true);

    let (out, took) = row_migrate([&src_qmp, &dst_qmp, &src.control, &dst.control], &[]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(took < AT_ONCE, "took {took:?}: {text}");
    assert!(text.contains("protect the migration stream differently") && text.contains("TLS"), "{text}");
    // Nothing started: the source proxy is idle, the destination still waits.
    assert_eq!(src.ctl().ok("query-migrate", json!({}))["phase"], "idle");
    assert_eq!(dst.ctl().ok("query-status", json!({}))["incoming-phase"], "waiting");
    a.terminate(STOP);
    b.terminate(STOP);
}
