//! Migration between two "hosts": network namespaces joined by a veth pair limited to
//! 100 Mbit/s with tbf. The source proxy runs in one namespace, the destination in the other;
//! their Unix sockets (control and NBD) are paths, so the test reaches both from here. The
//! destination must end identical to the source, and round 1 must take as long as the link
//! makes it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::migration::*;
use e2e::*;
use serde_json::json;

/// `nbd-row-proxy SUBCOMMAND --image IMAGE --socket DIR/nbd.sock --control DIR/control.sock
/// --auth-key-file KEY EXTRA...` run inside namespace `ns`.
fn proxy_in(ns: &str, dir: &Path, subcommand: &str, image: &Path, key: &Path, extra: &[&str]) -> Host {
    let socket = dir.join("nbd.sock");
    let control = dir.join("control.sock");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(bin("nbd-row-proxy"))
        .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(image))
        .arg(subcommand)
        .arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(&socket)
        .arg("--control")
        .arg(&control)
        .arg("--auth-key-file")
        .arg(key)
        .args(extra);
    cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
    let mut proc = Proc::spawn(&format!("nbd-row-proxy {subcommand} in {ns}"), &mut cmd, &dir.join("server.log"));
    proc.wait_for_socket(&socket);
    proc.wait_for_socket(&control);
    // `ip netns exec` execs the command in place, so the pid we hold (and stop) is the proxy's.
    let exe = std::fs::read_link(format!("/proc/{}/exe", proc.pid())).unwrap();
    assert!(exe.ends_with("nbd-row-proxy"), "pid {} is {}, not the proxy", proc.pid(), exe.display());
    Host { server: Server { proc, socket }, control, image: image.to_path_buf() }
}

/// The namespace a process runs in, as `net:[INODE]`.
fn netns_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
}

#[test]
fn row_migration_over_a_100_mbit_link_between_namespaces() {
    let hosts = TwoHosts::create(Some("100mbit"));
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let key = key_file(a_dir.path(), "two-namespaces-key-0123456789abcdef");
    let (image, data) = source_image(a_dir.path(), 41);
    let src = proxy_in(&hosts.a, a_dir.path(), "serve", &image, &key, &[]);
    let dst_image = b_dir.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = 7410;
    let listen = format!("{ADDR_B}:{port}");
    let dst = proxy_in(&hosts.b, b_dir.path(), "receive", &dst_image, &key, &["--listen", &listen]);
    let (na, nb) = (netns_of(src.server.proc.pid()), netns_of(dst.server.proc.pid()));
    assert!(na != nb && na != netns_of(std::process::id()), "the proxies should run in two other namespaces");

    // The destination's events tell when each round starts arriving there.
    let mut dst_events = dst.ctl();
    let writer = Writer::start(&src.server.socket, data, 42, 1500);
    std::thread::sleep(Duration::from_millis(300));
    let mut ctl = src.ctl();
    let started = Instant::now();
    ctl.ok("migrate-start", json!({"uri": format!("tcp:{ADDR_B}:{port}"), "strategy": "row"}));
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    let precopy = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    writer.wait_writes(201);
    let (model, writes) = writer.stop();
    assert!(writes > 200, "the writer should have been busy during the rounds ({writes} writes)");
    let finish_started = Instant::now();
    let status = ctl.ok("migrate-finish", json!({}));
    let finish = finish_started.elapsed();
    assert_eq!(status["phase"], "handed-over", "{status}");

    assert!(read_all(&src.server) == model, "the source lost a write");
    assert!(std::fs::read(&dst_image).unwrap() == model, "the destination image differs from the source");
    assert!(read_all(&dst.server) == model, "the destination's export differs");
    ctl.ok("migrate-complete", json!({}));

    let rounds = status["rounds"].as_array().unwrap();
    // Base, cold updates, maybe settle passes (the final round is held to 50 ms of link time), final.
    assert!(rounds.len() >= 3, "{status}");
    assert_eq!(rounds.last().unwrap()["kind"], "final", "{status}");
    let round1 = &rounds[0];
    let (wire, secs) = (round1["wire-bytes"].as_u64().unwrap(), round1["seconds"].as_f64().unwrap());
    // The source's round time ends when the last bytes enter its socket buffer; the
    // destination's events say when round 1 started and finished arriving (round 2 began).
    let mut arrivals = std::collections::BTreeMap::new();
    while let Some(e) = dst_events.next_event(Duration::from_millis(200)) {
        if let (true, Some(round)) = (e.event == "MIGRATION_INCOMING", e.data["round"].as_u64()) {
            arrivals.insert(round, e.timestamp.seconds as f64 + e.timestamp.microseconds as f64 / 1e6);
        }
    }
    let (Some(r1), Some(r2)) = (arrivals.get(&1), arrivals.get(&2)) else {
        panic!("the destination did not report rounds 1 and 2 arriving: {arrivals:?}")
    };
    let arrived = r2 - r1;
    let rate = wire as f64 / arrived;
    eprintln!(
        "100 Mbit/s link: {writes} writes; round 1: {wire} B, {secs:.2} s at the source, {arrived:.2} s at the \
         destination ({:.1} Mbit/s); rounds {}; pre-copy {:.2} s, migrate-finish {:.3} s, total {:.2} s",
        rate * 8.0 / 1e6,
        serde_json::to_string(rounds).unwrap(),
        precopy.as_secs_f64(),
        finish.as_secs_f64(),
        (precopy + Duration::from_millis(300) + finish).as_secs_f64(),
    );
    // About 28 MiB of random data (less what the writer trimmed before the start) does not
    // compress: at 100 Mbit/s that takes at least ~2.3 s.
    assert!(wire > 27 << 20, "round 1 should carry the image's data: {round1}");
    assert!(arrived >= 2.0, "round 1 arrived in {arrived:.2} s: faster than the 100 Mbit/s link allows");
    // tbf lets a 256 KB burst through on top of the rate.
    assert!(
        rate <= 100e6 / 8.0 * 1.05 + 256e3 / arrived,
        "round 1 arrived at {:.1} Mbit/s on a 100 Mbit/s link",
        rate * 8.0 / 1e6
    );
    drop((src, dst));
}
