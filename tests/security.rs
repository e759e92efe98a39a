//! The transport's protection and the bounds every peer meets, against the real binaries:
//! - NBD over TCP needs TLS (STARTTLS, client certificates) and works with `qemu-io`,
//!   `qemu-img` and `nbdinfo` given the credentials; without them, or with another CA's, it is
//!   refused;
//! - the migration stream, over TLS or sealed with the key, never shows the disk in clear (a
//!   sniffer between the hosts looks for a known 4 KiB pattern), and a relay that flips a byte,
//!   replays a record or drops one makes the migration fail and roll back, nothing committed;
//! - a stream with neither TLS nor a key needs `--insecure` on both ends;
//! - bounds: negotiation times out, connections are capped, a client that does not read its
//!   replies is not read either (memory stays bounded), strangers cannot keep the source out of
//!   `receive`, a silent session times out, the control socket caps its clients.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::migration::*;
use e2e::*;
use nbd_proto::Command as Cmd;
use nbd_row_proxy::migration::{HANDSHAKE_TIMEOUT, SESSION_IDLE_TIMEOUT};
use nbd_row_proxy::nbd::connection::NEGOTIATION_TIMEOUT;
use serde_json::{json, Value};

const KEY: &str = "security-test-key-0123456789abcdef";

/// How long a silent session may last: the destination's idle timeout, and a margin for a busy
/// machine.
const SILENT_LIMIT: Duration = Duration::from_secs(SESSION_IDLE_TIMEOUT.as_secs() + 30);

fn qemu_tls_object(pki: &Path) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.display())
}

fn nbd_opts(port: u16, tls: bool) -> String {
    let mut o = format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port}");
    if tls {
        o.push_str(",tls-creds=tls0");
    }
    o
}

#[test]
fn nbd_over_tcp_needs_tls_and_works_with_qemu_tools_and_libnbd() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let pki = lab_pki(&dir.path().join("pki"));
    let stranger = lab_pki(&dir.path().join("stranger"));
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 8 << 20);
    let img = image.to_str().unwrap();
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    // --tcp without TLS is refused unless the operator says the network is trusted.
    let out = Command::new(bin("nbd-row-proxy"))
        .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&image))
        .args(["serve", "--image", img, "--socket", dir.path().join("x.sock").to_str().unwrap(), "--tcp", &tcp])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-creds"), "{}", String::from_utf8_lossy(&out.stderr));
    let server = Server::start(dir.path(), &image, &["--tcp", &tcp, "--tls-creds", pki.to_str().unwrap()]);

    // qemu-io over TLS with the site's credentials: write, then read back.
    let io = Command::new("qemu-io")
        .args(["--object", &qemu_tls_object(&pki), "--image-opts", &nbd_opts(port, true)])
        .args(["-c", "write -P 0x5a 65536 65536", "-c", "read -P 0x5a 65536 65536"])
        .output()
        .unwrap();
    assert!(io.status.success(), "qemu-io over TLS: {}", String::from_utf8_lossy(&io.stderr));
    let info = Command::new("qemu-img")
        .args(["info", "--object", &qemu_tls_object(&pki), "--image-opts", &nbd_opts(port, true)])
        .output()
        .unwrap();
    assert!(info.status.success(), "qemu-img info over TLS: {}", String::from_utf8_lossy(&info.stderr));
    assert!(String::from_utf8_lossy(&info.stdout).contains("8 MiB"), "{}", String::from_utf8_lossy(&info.stdout));
    let uri = format!("nbds://127.0.0.1:{port}/?tls-certificates={}", pki.display());
    let ni = Command::new("nbdinfo").args(["--size", &uri]).output().unwrap();
    assert!(ni.status.success(), "nbdinfo over TLS: {}", String::from_utf8_lossy(&ni.stderr));
    assert_eq!(String::from_utf8_lossy(&ni.stdout).trim(), (8u64 << 20).to_string());

    // Without TLS: refused (NBD_REP_ERR_TLS_REQD); with another CA's certificate: refused.
    let plain =
        Command::new("qemu-io").args(["--image-opts", &nbd_opts(port, false), "-c", "read 0 512"]).output().unwrap();
    assert!(!plain.status.success(), "qemu-io without TLS got in");
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(err.contains("TLS") || err.contains("tls"), "{err}");
    let ni = Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/")).output().unwrap();
    assert!(!ni.status.success(), "nbdinfo without TLS got in");
    let io = Command::new("qemu-io")
        .args(["--object", &qemu_tls_object(&stranger), "--image-opts", &nbd_opts(port, true), "-c", "read 0 512"])
        .output()
        .unwrap();
    assert!(!io.status.success(), "a client of another CA got in");
    // gnutls clients dialling an IP address send it as the server name; rustls' warning about
    // that is not the operator's business.
    let log = server.proc.log_text();
    assert!(!log.lines().any(|l| l.contains("WARN") && l.contains("rustls")), "{log}");
}

/// One side's protection arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Protection {
    /// The key alone: sealed records.
    Key,
    /// TLS (and the key as a second factor).
    Tls,
    /// Neither (`--insecure` on both ends).
    Insecure,
}

fn protection_args(p: Protection, key: &Path, pki: &Path) -> Vec<String> {
    match p {
        Protection::Key => vec!["--auth-key-file".into(), key.display().to_string()],
        Protection::Tls => {
            vec!["--tls-creds".into(), pki.display().to_string(), "--auth-key-file".into(), key.display().to_string()]
        }
        Protection::Insecure => vec!["--insecure".into()],
    }
}

/// What the relay does to the source→destination stream.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tamper {
    None,
    Flip,
    Replay,
    Drop,
}

/// A TCP relay between source and destination that records what the source sends and can
/// tamper with one unit of it (a sealed record, or a TLS record) once the handshake is over.
struct Relay {
    port: u16,
    recorded: Arc<Mutex<Vec<u8>>>,
    tampered: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
}

impl Relay {
    fn start(target: u16, protection: Protection, tamper: Tamper) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let tampered = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (rec, tam, fwd) = (recorded.clone(), tampered.clone(), forwarded.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { return };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Destination → source: copied as it is.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (s2, c2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
                let (rec, tam, fwd) = (rec.clone(), tam.clone(), fwd.clone());
                std::thread::spawn(move || relay_units(client, server, protection, tamper, &rec, &tam, &fwd));
            }
        });
        Self { port, recorded, tampered, forwarded }
    }

    fn sniffed(&self) -> Vec<u8> {
        self.recorded.lock().unwrap().clone()
    }
}

/// The source→destination direction, unit by unit: the plain handshake frame(s), then sealed
/// records; or TLS records throughout.
fn relay_units(
    mut from: TcpStream,
    mut to: TcpStream,
    protection: Protection,
    tamper: Tamper,
    rec: &Mutex<Vec<u8>>,
    tampered: &AtomicBool,
    forwarded: &AtomicU64,
) {
    let mut buf = Vec::new();
    let mut units = 0u64;
    let mut previous: Vec<u8> = Vec::new();
    loop {
        let len = match protection {
            // The ClientHello is one plain frame: 8-byte header (payload length at 4..8), payload, CRC.
            Protection::Key | Protection::Insecure if units == 0 => {
                buf.get(4..8).map(|l| 8 + u32::from_le_bytes(l.try_into().unwrap()) as usize + 4)
            }
            Protection::Key => buf.get(..4).map(|l| 4 + u32::from_le_bytes(l.try_into().unwrap()) as usize),
            Protection::Tls => buf.get(3..5).map(|l| 5 + u16::from_be_bytes(l.try_into().unwrap()) as usize),
            // Insecure: frames all the way (header, payload, CRC).
            Protection::Insecure => buf.get(4..8).map(|l| 8 + u32::from_le_bytes(l.try_into().unwrap()) as usize + 4),
        };
        match len {
            Some(n) if buf.len() >= n => {
                let mut unit: Vec<u8> = buf.drain(..n).collect();
                units += 1;
                rec.lock().unwrap().extend_from_slice(&unit);
                // Tamper with a data-carrying unit well into the stream, once.
                let data_unit = match protection {
                    Protection::Tls => unit[0] == 0x17 && units > 12,
                    _ => units > 6,
                };
                let mut out = Vec::new();
                if data_unit && tamper != Tamper::None && !tampered.swap(true, Ordering::SeqCst) {
                    match tamper {
                        Tamper::Flip => {
                            let i = unit.len() / 2;
                            unit[i] ^= 0x20;
                            out.extend_from_slice(&unit);
                        }
                        Tamper::Replay => {
                            out.extend_from_slice(&previous);
                            out.extend_from_slice(&unit);
                        }
                        Tamper::Drop => {}
                        Tamper::None => unreachable!(),
                    }
                } else {
                    out.extend_from_slice(&unit);
                }
                previous = unit;
                if to.write_all(&out).is_err() {
                    return;
                }
                forwarded.fetch_add(out.len() as u64, Ordering::SeqCst);
            }
            _ => {
                let mut chunk = [0u8; 65536];
                match from.read(&mut chunk) {
                    Ok(0) | Err(_) => {
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        }
    }
}

/// A source whose image holds a known random 4 KiB pattern in many places, and a destination
/// behind a relay; both with `protection`.
struct Hosts {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    src: Host,
    dst: Host,
    relay: Relay,
    pattern: Vec<u8>,
    data: Vec<u8>,
}

fn hosts(protection: Protection, tamper: Tamper, seed: u64) -> Hosts {
    let (sd, dd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = key_file(sd.path(), KEY);
    let pki = lab_pki(&sd.path().join("pki"));
    let (image, mut data) = source_image(sd.path(), seed);
    let pattern = random_bytes(seed ^ 0x5eed_5eed, BS);
    for i in 0..64 {
        let off = (1000 + i * 13) * BS;
        data[off..off + BS].copy_from_slice(&pattern);
    }
    std::fs::write(&image, &data).unwrap();
    let args = protection_args(protection, &key, &pki);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let src = source_with(sd.path(), &image, &args);
    let dst_image = dd.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let dst = destination_with(dd.path(), &dst_image, &args, port);
    let relay = Relay::start(port, protection, tamper);
    Hosts { _dirs: (sd, dd), src, dst, relay, pattern, data }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn migrate(h: &Hosts) -> Result<Value, String> {
    let mut ctl = h.src.ctl();
    let args = json!({ "uri": format!("tcp:127.0.0.1:{}", h.relay.port), "strategy": "row", "compress": false });
    ctl.execute("migrate-start", args)?;
    let start = Instant::now();
    loop {
        let m = ctl.ok("query-migrate", json!({}));
        match m["phase"].as_str() {
            Some("ready") => break,
            Some("failed") => return Err(m["error"].as_str().unwrap_or_default().to_string()),
            _ => {}
        }
        assert!(start.elapsed() < HANG_LIMIT, "pre-copy did not end: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    ctl.execute("migrate-finish", json!({}))
}

#[test]
fn the_disk_never_crosses_the_wire_in_clear_unless_insecure() {
    for (protection, seed) in [(Protection::Key, 1), (Protection::Tls, 2), (Protection::Insecure, 3)] {
        let h = hosts(protection, Tamper::None, seed);
        let status = migrate(&h).unwrap_or_else(|e| panic!("{protection:?}: {e}"));
        assert_eq!(status["phase"], "handed-over", "{protection:?}: {status}");
        assert!(read_all(&h.dst.server) == h.data, "{protection:?}: the destination's disk differs");
        let sniffed = h.relay.sniffed();
        assert!(sniffed.len() > 12 << 20, "{protection:?}: the relay saw {} bytes", sniffed.len());
        // The control: without protection the sniffer does see the pattern.
        assert_eq!(
            contains(&sniffed, &h.pattern),
            protection == Protection::Insecure,
            "{protection:?}: the known 4 KiB pattern {} on the wire",
            if protection == Protection::Insecure { "was not found" } else { "appeared in clear" }
        );
        eprintln!(
            "{protection:?}: {} bytes on the wire, pattern in clear: {}",
            sniffed.len(),
            contains(&sniffed, &h.pattern)
        );
    }
}

#[test]
fn a_flipped_replayed_or_dropped_record_fails_the_migration_and_nothing_is_committed() {
    let mut seed = 10;
    for protection in [Protection::Key, Protection::Tls] {
        for tamper in [Tamper::Flip, Tamper::Replay, Tamper::Drop] {
            seed += 1;
            let h = hosts(protection, tamper, seed);
            let r = migrate(&h);
            assert!(h.relay.tampered.load(Ordering::SeqCst), "{protection:?} {tamper:?}: the relay never tampered");
            let error = r.expect_err(&format!("{protection:?} {tamper:?}: the migration went through"));
            eprintln!("{protection:?} {tamper:?}: {error} (after {} bytes)", h.relay.forwarded.load(Ordering::SeqCst));
            // Nothing committed: the destination still waits, and refuses writes.
            let d = h.dst.ctl().ok("query-status", json!({}));
            assert_eq!(d["incoming"], true, "{protection:?} {tamper:?}: {d}");
            assert_ne!(d["incoming-phase"], "committed", "{d}");
            // The source rolled back: direct mode again, every byte as it was, writable.
            let start = Instant::now();
            loop {
                let s = h.src.ctl().ok("query-status", json!({}));
                if s["mode"] == "direct" {
                    break;
                }
                assert!(start.elapsed() < HANG_LIMIT, "{s}");
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(read_all(&h.src.server) == h.data, "{protection:?} {tamper:?}: the source changed");
        }
    }
}

#[test]
fn a_stream_with_neither_tls_nor_key_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let out = Command::new(bin("nbd-row-proxy"))
        .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&image))
        .args(["receive", "--image", image.to_str().unwrap(), "--socket"])
        .arg(dir.path().join("n.sock"))
        .args(["--listen", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"), "{}", String::from_utf8_lossy(&out.stderr));
    let src = source_with(dir.path(), &image, &[]);
    let e = src.ctl().execute("migrate-start", json!({ "uri": "tcp:127.0.0.1:1" })).unwrap_err();
    assert!(e.contains("--tls-creds") && e.contains("--insecure"), "{e}");
    drop(src); // it holds the image's lock
               // A source with a key against a destination with TLS: a clear error, not a hang.
    let h_dir = tempfile::tempdir().unwrap();
    let key = key_file(h_dir.path(), KEY);
    let pki = lab_pki(&h_dir.path().join("pki"));
    let dst_image = h_dir.path().join("d.raw");
    sparse_file(&dst_image, 1 << 20);
    let port = free_port();
    let _dst = destination_with(h_dir.path(), &dst_image, &["--tls-creds", pki.to_str().unwrap()], port);
    let keyed = tempfile::tempdir().unwrap();
    let src = source_with(keyed.path(), &image, &["--auth-key-file", key.to_str().unwrap()]);
    let started = Instant::now();
    let e = src.ctl().execute("migrate-start", json!({ "uri": format!("tcp:127.0.0.1:{port}") })).unwrap_err();
    // Within the handshake's own timeout and a margin for a busy machine, well before the
    // destination's 30 s timers could end it instead.
    assert!(started.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(e.contains("TLS") || e.contains("greet"), "{e}");
    drop(src);

    // The other way round: a source with TLS against a destination with a key only. Both sides
    // name the mismatch (not a TLS decoding error on one side and a frame error on the other).
    let k_dir = tempfile::tempdir().unwrap();
    let key = key_file(k_dir.path(), KEY);
    let k_image = k_dir.path().join("d.raw");
    sparse_file(&k_image, 1 << 20);
    let port = free_port();
    let dst = destination_with(k_dir.path(), &k_image, &["--auth-key-file", key.to_str().unwrap()], port);
    let tls_dir = tempfile::tempdir().unwrap();
    let src = source_with(tls_dir.path(), &image, &["--tls-creds", pki.to_str().unwrap()]);
    let e = src.ctl().execute("migrate-start", json!({ "uri": format!("tcp:127.0.0.1:{port}") })).unwrap_err();
    assert!(e.contains("does not speak TLS") && e.contains("same protection"), "{e}");
    let start = Instant::now();
    while !dst.server.proc.log_text().contains("the source speaks TLS and this proxy has no --tls-creds") {
        assert!(start.elapsed() < HANG_LIMIT, "the destination's log: {}", dst.server.proc.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_that_does_not_read_its_replies_is_not_read_either() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(7, 64 << 20)).unwrap();
    let server = Server::start(dir.path(), &image, &[]);
    let pid = server.proc.pid();
    let before = rss_kib(pid);
    // 300 pipelined 2 MiB READs (600 MiB of replies) from a client that reads none of them.
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let mut wire = Vec::new();
    for i in 0..300u64 {
        request(Cmd::Read, i, (i % 32) * (2 << 20), 2 << 20).encode(&mut wire);
    }
    c.send_raw(&wire).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let (rss, th) = (rss_kib(pid), threads(pid));
    eprintln!("300 unread 2 MiB reads: RSS {} -> {} KiB, {} threads", before, rss, th);
    assert!(rss < before + 100 * 1024, "RSS grew by {} MiB", (rss - before) / 1024);
    assert!(th < 64, "{th} threads");
    // Once the client reads, every reply comes, right.
    for _ in 0..300 {
        let r = c.recv().unwrap();
        assert_eq!((r.error, r.data.len()), (0, 2 << 20));
    }
    // Writes: the payloads are not read before there is room for them.
    let mut w = RawClient::connect(&server.socket, "", true).unwrap();
    let writer = std::thread::spawn(move || {
        let payload = vec![0xabu8; 2 << 20];
        let mut sent = 0;
        for i in 0..300u64 {
            let mut req = Vec::new();
            request(Cmd::Write, i, (i % 32) * (2 << 20), 2 << 20).encode(&mut req);
            if w.send_raw(&req).is_err() || w.send_raw(&payload).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_kib(pid);
    eprintln!("300 pipelined 2 MiB writes, replies unread: RSS {} KiB", rss);
    assert!(rss < before + 100 * 1024, "RSS grew by {} MiB with unread write replies", (rss - before) / 1024);
    drop(server);
    let _ = writer.join();
}

#[test]
fn negotiation_times_out_and_connections_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let control = dir.path().join("ctl.sock");
    let server = Server::start(dir.path(), &image, &["--max-connections", "4", "--control", control.to_str().unwrap()]);
    // Four idle connections fill the cap; a fifth is closed at once; the control socket answers.
    // Each idle one is served (it gets the greeting); the probe connection Server::start made
    // may hold a slot for a moment, so a refused one is tried again.
    let idle: Vec<std::os::unix::net::UnixStream> = (0..4)
        .map(|_| {
            e2e::rig::wait_until("an idle connection to be served", HANG_LIMIT, || {
                let mut s = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut greeting = [0u8; 18];
                s.read_exact(&mut greeting).ok().map(|_| s)
            })
        })
        .collect();
    let mut fifth = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    fifth.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(fifth.read(&mut buf).unwrap_or(0), 0, "a connection beyond the cap was served");
    ControlClient::connect(&control).ok("query-status", json!({}));
    // The idle ones are dropped when negotiation takes too long (the server's timer, with a
    // margin for a busy machine); then clients get in again.
    let limit = NEGOTIATION_TIMEOUT + Duration::from_secs(20);
    let start = Instant::now();
    for mut s in idle {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut greeting = Vec::new();
        let _ = s.read_to_end(&mut greeting);
    }
    let waited = start.elapsed();
    assert!(waited < limit, "idle connections lasted {waited:?}");
    // Their slots are free as soon as the server has seen them go (a moment after they see EOF).
    e2e::rig::wait_until("a client to be served after the idle ones timed out", HANG_LIMIT, || {
        RawClient::connect(&server.socket, "", true).ok()
    });

    // The control socket caps its clients too, and keeps serving those it has.
    let mut clients: Vec<ControlClient> = (0..16).map(|_| ControlClient::connect(&control)).collect();
    let mut extra = std::os::unix::net::UnixStream::connect(&control).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(extra.read(&mut buf).unwrap_or(0), 0, "a control client beyond the cap was served");
    clients[0].ok("query-status", json!({}));
}

#[test]
fn strangers_cannot_keep_the_source_out_and_a_silent_session_times_out() {
    let (sd, dd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = key_file(sd.path(), KEY);
    let (image, data) = source_image(sd.path(), 21);
    let src = source(sd.path(), &image, &key);
    let dst_image = dd.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let dst = destination(dd.path(), &dst_image, &key, port);
    // Forty idle strangers on the migration port; the real source still gets in at once.
    let strangers: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    // migrate-start returns once the session is accepted: the strangers must not make it wait
    // out their handshake timeouts (the pre-copy after it is disk work, and not timed).
    let started = Instant::now();
    let mut ctl = src.ctl();
    ctl.ok("migrate-start", json!({ "uri": format!("tcp:127.0.0.1:{port}") }));
    assert!(started.elapsed() < 3 * HANDSHAKE_TIMEOUT, "the source waited {:?}", started.elapsed());
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    assert_eq!(ctl.ok("migrate-finish", json!({}))["phase"], "handed-over");
    assert!(read_all(&dst.server) == data);
    drop(strangers);

    // An authenticated session that goes silent (no frame, no keepalive) is dropped.
    let image2 = dd.path().join("d2.raw");
    sparse_file(&image2, SIZE as u64);
    let port2 = free_port();
    let d2 = destination(&dd.path().join("second").tap_mkdir(), &image2, &key, port2);
    let silent = std::thread::spawn(move || hold_silent_session(port2));
    let start = Instant::now();
    let closed_after = silent.join().unwrap();
    eprintln!("silent session closed after {closed_after:?}");
    assert!(closed_after < SILENT_LIMIT, "a silent session lasted {closed_after:?}");
    assert!(start.elapsed() >= Duration::from_secs(20));
    assert_eq!(d2.ctl().ok("query-status", json!({}))["incoming-phase"], "waiting");
}

trait Mkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl Mkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Authenticates as a source (sealed), begins a session, then sends nothing; returns how long
/// the destination kept the connection.
fn hold_silent_session(port: u16) -> Duration {
    use migration_stream::seal::{derive, Sealer};
    use migration_stream::{Message, SessionParams};
    let key = migration_stream::Key::from_bytes(KEY.as_bytes());
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut buf = Vec::new();
    let mut next = |s: &mut TcpStream| loop {
        if let Some((m, n)) = Message::decode(&buf).unwrap() {
            buf.drain(..n);
            return m;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    };
    let Message::ServerHello { nonce: sn, .. } = next(&mut s) else { panic!() };
    let params = SessionParams {
        session_id: [7; 16],
        disk_size: SIZE as u64,
        block_size: 4096,
        strategy: migration_stream::Strategy::Row,
    };
    let cn = migration_stream::nonce();
    let mac = migration_stream::client_mac(&key, &sn, &cn, &params);
    let mut out = Vec::new();
    Message::ClientHello { version: migration_stream::VERSION, params: params.clone(), nonce: cn, mac }
        .encode(&mut out);
    s.write_all(&out).unwrap();
    assert!(matches!(next(&mut s), Message::Accept { .. }));
    let keys = derive(&key, &sn, &cn, &params);
    let mut plain = Vec::new();
    Message::RoundBegin { round: 1, kind: migration_stream::RoundKind::Base }.encode(&mut plain);
    let mut sealed = Vec::new();
    Sealer::new(&keys.to_destination).seal(&plain, &mut sealed);
    s.write_all(&sealed).unwrap();
    let start = Instant::now();
    s.set_read_timeout(Some(SILENT_LIMIT + Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    start.elapsed()
}

/// A TCP NBD connection (no TLS: the server runs with --insecure) through negotiation, with
/// simple replies; the server then waits for requests as long as it stays open. `Err` when the
/// server closed it at once (its pool was full).
fn tcp_negotiated(port: u16) -> std::io::Result<TcpStream> {
    use nbd_proto::consts::*;
    use nbd_proto::option::InfoRequest;
    use nbd_proto::{ClientFlags, ClientOption, OptionReply, OptionReplyKind};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(HANG_LIMIT))?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    let mut out = Vec::new();
    ClientFlags { bits: NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES }.encode(&mut out);
    ClientOption::Go(InfoRequest { export: String::new(), requests: vec![] }).encode(&mut out);
    s.write_all(&out)?;
    let mut buf = Vec::new();
    loop {
        if let Some((reply, n)) = OptionReply::decode(&buf).map_err(std::io::Error::other)? {
            buf.drain(..n);
            match reply.kind {
                OptionReplyKind::Ack => return Ok(s),
                OptionReplyKind::Error { code, message } => {
                    return Err(std::io::Error::other(format!("refused: {code:#x} {message}")))
                }
                _ => continue,
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the server closes a new connection at once, without a greeting.
fn closed_at_once(mut s: impl Read) -> bool {
    let mut buf = [0u8; 18];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

#[test]
fn tcp_clients_cannot_keep_qemus_unix_socket_out() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let data = random_bytes(11, 1 << 20);
    std::fs::write(&image, &data).unwrap();
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let server = Server::start(dir.path(), &image, &["--tcp", &tcp, "--insecure", "--max-connections", "4"]);
    // Four TCP clients fill the TCP pool (negotiated, so no timer ends them); a fifth is closed
    // at once.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| e2e::rig::wait_until("a TCP connection to be served", HANG_LIMIT, || tcp_negotiated(port).ok()))
        .collect();
    let fifth = TcpStream::connect(("127.0.0.1", port)).unwrap();
    fifth.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_at_once(&fifth), "a TCP connection beyond the cap was served");
    // QEMU's socket still gets in, and reads.
    let mut unix: Vec<RawClient> = (0..4)
        .map(|_| {
            e2e::rig::wait_until("a Unix client to be served", HANG_LIMIT, || {
                RawClient::connect(&server.socket, "", true).ok()
            })
        })
        .collect();
    let r = unix[0].call(request(Cmd::Read, 1, 4096, 8192), &[]).unwrap();
    assert!((r.error, &r.data[..]) == (0, &data[4096..12288]), "a Unix client read wrong data");
    // The Unix pool is capped on its own, and full now: neither pool takes from the other.
    let extra = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_at_once(&extra), "a Unix connection beyond the cap was served");
    drop(held.pop());
    held.push(e2e::rig::wait_until("a TCP slot to be free again", HANG_LIMIT, || tcp_negotiated(port).ok()));
    drop(unix.pop());
    let mut again = e2e::rig::wait_until("a Unix slot to be free again", HANG_LIMIT, || {
        RawClient::connect(&server.socket, "", true).ok()
    });
    assert_eq!(again.call(request(Cmd::Read, 2, 0, 4096), &[]).unwrap().data, data[..4096]);
}

/// Sends `count` READs of `len` bytes on a simple-reply TCP connection, and reads none of them.
fn tcp_reads(s: &mut TcpStream, count: u64, len: u32) {
    let mut wire = Vec::new();
    for i in 0..count {
        request(Cmd::Read, i, 0, len).encode(&mut wire);
    }
    s.write_all(&wire).unwrap();
}

/// Reads `count` simple replies of `len` bytes each; returns how many were successful reads.
fn tcp_replies(s: &mut TcpStream, count: u64, len: u32) -> u64 {
    let mut ok = 0;
    let mut data = vec![0u8; len as usize];
    for _ in 0..count {
        let mut header = [0u8; 16];
        s.read_exact(&mut header).unwrap();
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        if error == 0 {
            s.read_exact(&mut data).unwrap();
            ok += 1;
        }
    }
    ok
}

#[test]
fn replies_unread_by_many_clients_stay_within_the_process_budget() {
    use nbd_row_proxy::nbd::connection::{MAX_IN_FLIGHT_BYTES, TCP_IN_FLIGHT_BYTES, TOTAL_IN_FLIGHT_BYTES};
    const LEN: u32 = 32 << 20;
    const READS: u64 = 2;
    const UNIX: usize = 12;
    const TCP: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(9, LEN as usize)).unwrap();
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let server = Server::start(dir.path(), &image, &["--tcp", &tcp, "--insecure"]);
    let pid = server.proc.pid();
    let before = rss_kib(pid);
    // Without a process-wide budget, each connection could hold its own 64 MiB: far more than
    // the bound below.
    let unbounded = (UNIX + TCP) as u64 * MAX_IN_FLIGHT_BYTES as u64;
    let budget = TOTAL_IN_FLIGHT_BYTES as u64;
    let bound = budget + (128 << 20);
    assert!(unbounded > 2 * bound);
    let mut tcp_clients: Vec<TcpStream> = (0..TCP).map(|_| tcp_negotiated(port).unwrap()).collect();
    for s in &mut tcp_clients {
        tcp_reads(s, READS, LEN);
    }
    let mut unix_clients: Vec<RawClient> =
        (0..UNIX).map(|_| RawClient::connect(&server.socket, "", true).unwrap()).collect();
    for c in &mut unix_clients {
        let mut wire = Vec::new();
        for i in 0..READS {
            request(Cmd::Read, i, 0, LEN).encode(&mut wire);
        }
        c.send_raw(&wire).unwrap();
    }
    // The budget fills up (how fast depends on the machine); then it holds.
    e2e::rig::wait_until("the replies to fill the budget", HANG_LIMIT, || {
        (rss_kib(pid).saturating_sub(before) * 1024 >= budget * 3 / 4).then_some(())
    });
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let grew = peak.saturating_sub(before) * 1024;
    eprintln!(
        "{} clients, {} MiB of unread replies asked for: RSS {} -> {} KiB (+{} MiB; budget {} MiB, TCP's share {} MiB)",
        UNIX + TCP,
        ((UNIX + TCP) as u64 * READS * LEN as u64) >> 20,
        before,
        peak,
        grew >> 20,
        budget >> 20,
        TCP_IN_FLIGHT_BYTES >> 20
    );
    assert!(grew < bound, "RSS grew by {} MiB, over the {} MiB budget and a margin", grew >> 20, budget >> 20);
    // Once the clients read, every reply comes, right: waiting for the budget is not a deadlock.
    let readers: Vec<std::thread::JoinHandle<u64>> = tcp_clients
        .into_iter()
        .map(|mut s| std::thread::spawn(move || tcp_replies(&mut s, READS, LEN)))
        .chain(unix_clients.into_iter().map(|mut c| {
            std::thread::spawn(move || {
                (0..READS).filter(|_| c.recv().is_ok_and(|r| r.error == 0 && r.data.len() == LEN as usize)).count()
                    as u64
            })
        }))
        .collect();
    let done: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(done, (UNIX + TCP) as u64 * READS);
}

#[test]
fn a_flood_of_refused_connections_logs_a_handful_of_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 1 << 20);
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let mut server = Server::start(dir.path(), &image, &["--tcp", &tcp, "--insecure", "--max-connections", "4"]);
    let started = Instant::now();
    // 200 clients that speak something else: each fails negotiation.
    for _ in 0..200 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(HANG_LIMIT)).unwrap();
        s.write_all(b"GET ").unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // 200 more beyond the cap: each is refused.
    let _held: Vec<TcpStream> = (0..4)
        .map(|_| e2e::rig::wait_until("a TCP connection to be served", HANG_LIMIT, || tcp_negotiated(port).ok()))
        .collect();
    for _ in 0..200 {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(HANG_LIMIT)).unwrap();
        assert!(closed_at_once(&s));
    }
    // The counts left out come in summaries, one per kind and interval: wait for them to add up.
    let counts = |log: &str| -> (u64, u64, u64) {
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
        // A line stands for its own event and those it says were left out before it; a
        // summary only for those it counts.
        let count = |what: &str, field: &str| -> u64 {
            warnings
                .iter()
                .filter(|l| l.contains(what))
                .map(|l| {
                    let n = l.split_whitespace().find_map(|w| w.strip_prefix(field)?.parse::<u64>().ok());
                    n.unwrap_or(0) + u64::from(field == "suppressed=")
                })
                .sum()
        };
        let failed = count("connection ended", "suppressed=") + count("ended before transmission", "failed=");
        let refused = count("refusing this one", "suppressed=") + count("more NBD connections refused", "refused=");
        (failed, refused, warnings.len() as u64)
    };
    let (failed, refused, lines) = e2e::rig::wait_until("the suppressed warnings to be counted", HANG_LIMIT, || {
        let c = counts(&server.proc.log_text());
        (c.0 >= 200 && c.1 >= 200).then_some(c)
    });
    let took = started.elapsed();
    let log = server.proc.log_text();
    assert_eq!(failed, 200, "{log}");
    assert!(refused >= 200, "{log}");
    // The first of each kind, then at most one line of each kind per 10 s.
    assert!(lines <= 2 * (took.as_secs() / 10 + 2), "{lines} warnings in {took:?}:\n{log}");
    assert!(!log.contains(" ERROR "), "{log}");
    server.proc.terminate(HANG_LIMIT);
}
