//! `row-migrate` end to end: a QEMU TCG guest on "host A" (a network namespace) runs
//! `row-workload`, which writes 4 KiB blocks with O_DIRECT to a hot set at 200 writes/s and
//! keeps its ledger in guest RAM; `row-migrate` moves the running guest and its disk to "host B"
//! (another namespace, joined to A by a veth pair), and the guest then reads every block it
//! wrote back and prints WORKLOAD-VERIFY-OK on the console of whichever host it runs on.
//!
//! Cases: the three strategies (row, bitmap, qemu-mirror) with `--verify-disk`, a second
//! migration back to A, and rollbacks: the destination proxy killed, Ctrl-C, `--timeout`, the
//! network dropped, and the destination QEMU killed during the memory migration. After a
//! rollback the guest must keep running on A with no write lost (it verifies on A) and the
//! destination QEMU must never have resumed.
//!
//! The tests run one at a time (a static mutex): two TCG guests already fill two cores.

use std::time::Duration;

use e2e::rig::*;
use e2e::*;
use nbd_proto::consts::NBD_EPERM;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

/// How long the guest writes (guest time, which stands still while it is paused), per kind
/// of case: long enough to span the migrations or the rollback and its checks.
const MIGRATE_SECONDS: u32 = 15;
const BACK_AND_FORTH_SECONDS: u32 = 25;
const ROLLBACK_SECONDS: u32 = 15;
/// The network case waits for `--timeout` and a rollback with the link down.
const NETWORK_DROP_SECONDS: u32 = 25;

// ---------------------------------------------------------------------------------------------
// Checks

/// The report of a successful migration (`verified`: run with `--verify-disk`).
fn check_report(report: &Value, strategy: &str, disk_rounds: Option<usize>, verified: bool) {
    assert_eq!(report["strategy"], strategy, "{report}");
    assert!(report["downtime-ms"].as_f64().unwrap_or(0.0) > 0.0, "downtime-ms: {report}");
    assert!(report["memory-bytes"].as_u64().unwrap_or(0) > 0, "memory-bytes: {report}");
    assert!(report["total-seconds"].as_f64().unwrap_or(0.0) > 0.0, "total-seconds: {report}");
    if verified {
        let v = &report["disk-verified"];
        assert!(v["compared-bytes"].as_u64().unwrap_or(0) > 0, "disk-verified: {report}");
        if strategy == "qemu-mirror" {
            // QEMU's mirror: both whole disks hashed while the guest is paused.
            assert_eq!(v["when"], "paused", "{report}");
            let sha = v["sha256"].as_str().unwrap_or_default();
            assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()), "disk-verified: {report}");
        } else {
            // The proxies compare after the switchover: nothing of it in the downtime.
            assert_eq!(v["when"], "after-switchover", "{report}");
            assert_eq!(report["verify-disk-ms"], 0.0, "{report}");
        }
    } else {
        assert!(report["disk-verified"].is_null(), "disk-verified without --verify-disk: {report}");
    }
    let disk = &report["disk"];
    assert!(disk["total-wire-bytes"].as_u64().is_some(), "disk total-wire-bytes: {report}");
    if let Some(n) = disk_rounds {
        let rounds = disk["rounds"].as_array().unwrap_or_else(|| panic!("no disk rounds: {report}"));
        // Row may add settle passes before the final round when the final round would be big.
        if strategy == "row" {
            assert!(rounds.len() >= n, "disk rounds: {report}");
        } else {
            assert_eq!(rounds.len(), n, "disk rounds: {report}");
        }
        assert_eq!(rounds.last().unwrap()["kind"], "final", "disk rounds: {report}");
        // Round 1 carries at least the source's data.
        assert!(rounds[0]["logical-bytes"].as_u64().unwrap_or(0) >= DATA_LEN, "round 1: {report}");
    } else {
        assert!(disk["total-wire-bytes"].as_u64().unwrap() >= DATA_LEN, "the mirror carried too little: {report}");
    }
}

/// The proxies after a migration from `s` to `d`: `d` serves directly and waits for nothing;
/// `s` refuses writes (`refuses_writes`: row and bitmap; QEMU's mirror leaves the source alone).
fn check_proxies_after(s: &Side, d: &Side, refuses_writes: bool) {
    let status = d.proxy_status();
    assert_eq!(status["mode"], "direct", "destination proxy: {status}");
    assert_eq!(status["incoming"], false, "destination proxy: {status}");
    if refuses_writes {
        let mut c = RawClient::connect(&s.nbd, EXPORT, true).unwrap();
        let reply = c.call(request(Cmd::Write, 1, 0, 4096), &[7; 4096]).unwrap();
        assert_eq!(reply.error, NBD_EPERM, "the source proxy {} accepted a write after the migration", s.name);
        let st = s.proxy_status();
        assert!(st["writes-refused"].is_string() || st["writes-refused"] == true, "source proxy: {st}");
    }
}

/// After a successful migration from `rig.sides[src]` to `rig.sides[dst]`: the proxies as
/// [`check_proxies_after`] wants them, the guest runs on `dst` only, keeps writing there and
/// verifies every block there, and the data outside its area arrived.
fn check_landed(rig: &mut Rig, src: usize, dst: usize, refuses_writes: bool) {
    let t0 = rig.t0;
    let landed = rig.secs();
    assert_ne!(src, dst);
    let (low, high) = rig.sides.split_at_mut(src.max(dst));
    let (s, d) = if src < dst { (&mut low[src], &mut high[0]) } else { (&mut high[0], &mut low[dst]) };

    check_proxies_after(s, d, refuses_writes);
    let src_state = s.qemu_status();
    assert!(src_state.as_deref() != Some("running"), "the source guest still runs: {src_state:?}");
    assert_eq!(d.qemu_status().as_deref(), Some("running"), "the destination guest does not run");

    let text = d.wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on {}; console:\n{text}", d.name);
    assert!(text.contains("WORKLOAD written="), "the guest did not write on {} after landing:\n{text}", d.name);
    let before = s.console_text();
    assert!(!before.contains("WORKLOAD-WRITES-DONE"), "the guest finished writing before it moved:\n{before}");
    // Cold data moved with the disk.
    use std::os::unix::fs::FileExt;
    let (mut x, mut y) = (vec![0u8; DATA_LEN as usize], vec![0u8; DATA_LEN as usize]);
    std::fs::File::open(&s.image).unwrap().read_exact_at(&mut x, DATA_OFFSET).unwrap();
    std::fs::File::open(&d.image).unwrap().read_exact_at(&mut y, DATA_OFFSET).unwrap();
    assert!(x == y, "the data outside the guest's area differs between {} and {}", s.name, d.name);
    let line = text.lines().find(|l| l.starts_with("WORKLOAD-VERIFY-OK")).unwrap_or_default();
    let now = t0.elapsed().as_secs_f64();
    eprintln!(
        "[{now:5.1}s] {} -> {}: the guest verified on {} {:.1} s after landing: {line}",
        s.name,
        d.name,
        d.name,
        now - landed
    );
}

/// Where the newest incarnation of `host` is in `rig.sides`.
fn index(rig: &Rig, host: HostId) -> usize {
    rig.sides.iter().rposition(|s| s.host == host).unwrap()
}

/// One successful A -> B migration with `--verify-disk`.
fn migrate_once(strategy: &str, dst_role: Role, rounds: Option<usize>) -> Value {
    let _serial = serial();
    let mut rig = Rig::start(dst_role, MIGRATE_SECONDS);
    std::thread::sleep(Duration::from_secs(2));
    let report = rig.migrate_ok(HostId::A, HostId::B, strategy, &["--verify-disk"]);
    check_report(&report, strategy, rounds, true);
    let (a, b) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_landed(&mut rig, a, b, dst_role == Role::Receive);
    eprintln!("[{:5.1}s] {strategy}: done", rig.secs());
    println!("REPORT {strategy}: {report}");
    report
}

// ---------------------------------------------------------------------------------------------
// Successful migrations

#[test]
fn row_strategy_moves_a_writing_guest_and_its_disk() {
    migrate_once("row", Role::Receive, Some(3));
}

#[test]
fn bitmap_strategy_moves_a_writing_guest_and_its_disk() {
    migrate_once("bitmap", Role::Receive, Some(4));
}

#[test]
fn qemu_mirror_strategy_moves_a_writing_guest_and_its_disk() {
    migrate_once("qemu-mirror", Role::MirrorTarget, None);
}

/// QEMU's mirror started in the background and switched to write-blocking at READY
/// (`block-job-change`, QEMU 8.2+; write-blocking from the start on an older QEMU).
#[test]
fn qemu_mirror_switches_to_write_blocking_at_ready() {
    let _serial = serial();
    let mut rig = Rig::start(Role::MirrorTarget, MIGRATE_SECONDS);
    std::thread::sleep(Duration::from_secs(2));
    let extra = ["--verify-disk", "--mirror-copy-mode", "ready-then-write-blocking"];
    let report = rig.migrate_ok(HostId::A, HostId::B, "qemu-mirror", &extra);
    check_report(&report, "qemu-mirror", None, true);
    let mode = report["disk"]["copy-mode"].as_str().unwrap_or_default();
    assert!(mode == "background, write-blocking at READY" || mode == "write-blocking", "{report}");
    let (a, b) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_landed(&mut rig, a, b, false);
}

/// RAM and disk post-copy together: `--ram-postcopy always` switches QEMU's memory copy to
/// post-copy a second into it (paced at 20 MB/s so that the copy takes seconds): the guest runs
/// on B while most of its pages are still on A and are fetched as it touches them, and the
/// final disk round is left for after the switchover; the guest's RAM ledger and every block
/// it wrote verify on B.
#[test]
fn ram_postcopy_moves_a_writing_guest_with_its_memory_still_on_a() {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, MIGRATE_SECONDS);
    std::thread::sleep(Duration::from_secs(2));
    // Paced, so that the memory copy's first pass takes seconds, not the blink of an unpaced veth.
    let args = ["--postcopy", "always", "--ram-postcopy", "always", "--max-bandwidth", "20MB/s"];
    let report = rig.migrate_ok(HostId::A, HostId::B, "row", &args);
    check_report(&report, "row", Some(3), false);
    let ram = &report["ram-postcopy"];
    assert!(ram["reason"].as_str().unwrap_or_default().contains("at once"), "{report}");
    assert!(ram["seconds"].as_f64().is_some() && ram["remaining-bytes"].as_u64().is_some(), "{report}");
    let (a, b) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_landed(&mut rig, a, b, true);
    eprintln!("[{:5.1}s] RAM post-copy: done", rig.secs());
}

/// A writing guest on A, `row-migrate --postcopy always` to B with the source's push held back
/// `hold_ms` after the switchover; returns once B runs the guest and misses blocks.
fn switch_over_with_postcopy_held(hold_ms: u32) -> (Rig, Driver) {
    let guest = Guest { resilient: true, ..Guest::default() };
    let hold = format!("postcopy-push:{hold_ms}");
    let mut rig = Rig::start_with(Role::Receive, MIGRATE_SECONDS, guest, &[("NBD_ROW_PAUSE", &hold)]);
    std::thread::sleep(Duration::from_secs(2));
    let driver = rig.spawn_driver(HostId::A, HostId::B, "row", &["--postcopy", "always"]);
    wait_until("a post-copy on B", HANG_LIMIT, || {
        rig.b().proxy_status()["postcopy"]["missing-blocks"].as_u64().filter(|n| *n > 0)
    });
    // The commit comes before QEMU's switchover: wait for the guest to run on B too.
    wait_until("the guest running on B", HANG_LIMIT, || {
        (rig.b().qemu_status().as_deref() == Some("running")).then_some(())
    });
    (rig, driver)
}

/// Post-copy with a real guest: `--postcopy always` switches over with the final round's blocks
/// still on A; the guest runs on B at once (its reads of those blocks fetch them), the push is
/// held back by the test hook and the link is cut for 5 s meanwhile; the push resumes over a new
/// connection (a guest paused by `rerror=stop` is resumed), and every write verifies on B.
#[test]
fn postcopy_moves_a_writing_guest_through_a_cut_link() {
    let _serial = serial();
    let (mut rig, driver) = switch_over_with_postcopy_held(6000);
    eprintln!("[{:5.1}s] post-copy running on B: cutting the link for 5 s", rig.secs());
    let veth = rig.net.veth_a.clone();
    let ns = rig.net.a.clone();
    let link = |state: &str| run_ok(std::process::Command::new("ip").args(["-n", &ns, "link", "set", &veth, state]));
    link("down");
    std::thread::sleep(Duration::from_secs(5));
    link("up");
    let res = driver.wait(HANG_LIMIT);
    assert!(res.success, "row-migrate failed after {:.1} s; stderr:\n{}", res.seconds, res.stderr);
    let report: Value = serde_json::from_str(res.stdout.lines().last().unwrap_or_default()).expect("a JSON report");
    eprintln!("[{:5.1}s] row-migrate done: {report}", rig.secs());
    check_report(&report, "row", Some(3), false);
    assert_eq!(report["postcopy"], true, "{report}");
    let pc = &report["disk"]["postcopy"];
    assert!(pc["done"] == true && pc["blocks"].as_u64().unwrap_or(0) > 0, "{report}");
    let b = rig.b().proxy_status();
    assert_eq!(b["postcopy"]["missing-blocks"], 0, "B holds every block: {b}");
    let (a, b) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_landed(&mut rig, a, b, true);
}

/// row-migrate killed while it waits for a post-copy push (the guest already runs on B):
/// `--recover` finds the destination guest running, waits for the push to end (the source is
/// the only copy of what B misses until then) and completes the source; nothing is lost.
#[test]
fn recover_after_a_kill_during_post_copy_waits_for_the_push() {
    let _serial = serial();
    let (mut rig, driver) = switch_over_with_postcopy_held(5000);
    eprintln!("[{:5.1}s] post-copy running on B: killing row-migrate", rig.secs());
    signal(driver.pid(), libc::SIGKILL);
    let killed = driver.wait(Duration::from_secs(10));
    assert_eq!(killed.code, None, "row-migrate was not killed: {}", killed.stderr);
    let res = rig.spawn_driver(HostId::A, HostId::B, "row", &["--recover"]).wait(HANG_LIMIT);
    eprintln!("[{:5.1}s] row-migrate --recover exited {:?}: {}", rig.secs(), res.code, res.stdout.trim());
    assert!(res.success, "--recover failed; stderr:\n{}", res.stderr);
    let report: Value = serde_json::from_str(res.stdout.lines().last().unwrap_or_default()).expect("a JSON report");
    assert_eq!(report["guest"], "destination", "{report}");
    let actions = report["actions"].to_string();
    assert!(actions.contains("waited for the post-copy push"), "{report}");
    assert!(actions.contains("migrate-complete"), "{report}");
    let b = rig.b().proxy_status();
    assert_eq!(b["postcopy"]["missing-blocks"], 0, "B holds every block: {b}");
    let (a, b) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_landed(&mut rig, a, b, true);
}

#[test]
fn guest_migrates_to_b_and_back_to_a() {
    let _serial = serial();
    let seconds = BACK_AND_FORTH_SECONDS;
    let mut rig = Rig::start(Role::Receive, seconds);
    std::thread::sleep(Duration::from_secs(2));
    // The first leg is case 1 without `--verify-disk`; the way back verifies (after the
    // switchover, while the guest writes on A).
    let first = rig.migrate_ok(HostId::A, HostId::B, "row", &[]);
    check_report(&first, "row", Some(3), false);
    let (a1, b1) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_proxies_after(&rig.sides[a1], &rig.sides[b1], true);
    // Host A again, from scratch: the old source goes away, a new receiver and QEMU take over.
    rig.sides[a1].kill_qemu();
    rig.sides[a1].kill_proxy();
    rig.new_side(HostId::A, Role::Receive, seconds);
    rig.b().wait_console("WORKLOAD written=", HANG_LIMIT);
    std::thread::sleep(Duration::from_secs(1));
    let back = rig.migrate_ok(HostId::B, HostId::A, "row", &["--verify-disk"]);
    check_report(&back, "row", Some(3), true);
    let (b, a2) = (index(&rig, HostId::B), index(&rig, HostId::A));
    assert_eq!(a2, 2);
    check_landed(&mut rig, b, a2, true);
}

// ---------------------------------------------------------------------------------------------
// Rollbacks

/// Runs a row migration from A to B that `inject` makes fail, then checks the rollback:
/// row-migrate exits non-zero with one line naming `keyword`, the guest keeps running on A
/// and verifies there, A's proxy goes back to direct mode, B's QEMU never resumed.
fn rollback_case(what: &str, seconds: u32, extra: &[&str], keyword: &str, inject: impl FnOnce(&mut Rig, &Driver)) {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, seconds);
    std::thread::sleep(Duration::from_secs(1));
    let driver = rig.spawn_driver(HostId::A, HostId::B, "row", extra);
    inject(&mut rig, &driver);
    let res = driver.wait(HANG_LIMIT);
    eprintln!(
        "[{:5.1}s] {what}: row-migrate exited after {:.1} s; stderr:\n{}",
        rig.secs(),
        res.seconds,
        res.stderr.trim_end()
    );
    assert!(!res.success, "row-migrate succeeded despite {what}; stdout:\n{}", res.stdout);
    // Exit code 3: rolled back, the guest runs on the source; --json says so, with each
    // component's state.
    assert_eq!(res.code, Some(3), "row-migrate's exit code after {what}; stderr:\n{}", res.stderr);
    let report: Value = serde_json::from_str(res.stdout.trim())
        .unwrap_or_else(|e| panic!("row-migrate --json printed no JSON failure report ({e}): {}", res.stdout));
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["exit-code"], 3, "{report}");
    assert_eq!(report["state"]["source-qemu"]["status"], "running", "{report}");
    assert!(report["state"]["source-proxy"]["writes-refused"].is_null(), "{report}");
    let errors: Vec<&str> =
        res.stderr.lines().filter(|l| l.starts_with("row-migrate: ") && *l != "row-migrate: rolling back").collect();
    assert_eq!(errors.len(), 1, "want exactly one error line on stderr:\n{}", res.stderr);
    let line = errors[0];
    assert!(line.contains(keyword), "the error line does not say {keyword:?}: {line}");
    assert!(line.contains("rolled back"), "the error line does not say it rolled back: {line}");
    assert!(res.stderr.contains("row-migrate: rolling back"), "stderr:\n{}", res.stderr);

    // The guest runs on A; A's proxy leaves ROW and serves directly again.
    let a = rig.a();
    assert_eq!(a.qemu_status().as_deref(), Some("running"), "the source guest does not run after the rollback");
    let mode = wait_until("the source proxy back in direct mode", HANG_LIMIT, || {
        let s = a.proxy_status();
        (s["mode"] == "direct").then_some(s)
    });
    assert!(mode["writes-refused"].is_null() || mode["writes-refused"] == false, "source proxy: {mode}");
    let phase = a.proxy_migration();
    assert!(
        matches!(phase["phase"].as_str(), Some("failed" | "cancelled" | "idle")),
        "the source proxy's migration should be over: {phase}"
    );
    // B's guest never resumed.
    let b = rig.b();
    let b_state = b.qemu_status();
    assert!(b_state.as_deref() != Some("running"), "the destination guest runs: {b_state:?}");
    let b_console = b.console_text();
    assert!(!b_console.contains("WORKLOAD"), "the guest printed on B:\n{b_console}");

    // No write lost: the guest keeps writing on A, then reads everything back there.
    let a = rig.a();
    let before = a.console_text();
    assert!(
        !before.contains("WORKLOAD-WRITES-DONE"),
        "the guest finished writing before the rollback was checked:\n{before}"
    );
    let text = a.wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on A after {what}; console:\n{text}");
    let b_state = rig.b().qemu_status();
    assert!(b_state.as_deref() != Some("running"), "the destination guest runs: {b_state:?}");
    let line = text.lines().find(|l| l.starts_with("WORKLOAD-VERIFY-OK")).unwrap_or_default().to_string();
    eprintln!("[{:5.1}s] {what}: rolled back, guest verified on A: {line}", rig.secs());
}

/// Waits until the source proxy's disk pre-copy has been running for `after` (round 1 started).
fn wait_precopy(rig: &mut Rig, after: Duration) {
    let a = rig.a();
    wait_until("the disk pre-copy", HANG_LIMIT, || {
        let m = a.proxy_migration();
        (m["phase"] == "precopy" && m["round"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    std::thread::sleep(after);
    let m = rig.a().proxy_migration();
    assert_eq!(m["phase"], "precopy", "the pre-copy should still run: {m}");
    eprintln!("[{:5.1}s] in pre-copy: round {} ({} blocks left)", rig.secs(), m["round"], m["round-remaining-blocks"]);
}

#[test]
fn rollback_when_the_destination_proxy_dies_during_precopy() {
    rollback_case(
        "the destination proxy killed",
        ROLLBACK_SECONDS,
        &["--max-bandwidth", "4MiB"],
        "disk migration failed",
        |rig, _| {
            wait_precopy(rig, Duration::from_secs(2));
            rig.b().kill_proxy();
        },
    );
}

#[test]
fn rollback_on_ctrl_c_during_precopy() {
    rollback_case("Ctrl-C", ROLLBACK_SECONDS, &["--max-bandwidth", "4MiB"], "interrupted", |rig, driver| {
        wait_precopy(rig, Duration::from_secs(2));
        signal(driver.pid(), libc::SIGINT);
    });
}

#[test]
fn rollback_on_timeout() {
    rollback_case(
        "--timeout 5s",
        ROLLBACK_SECONDS,
        &["--max-bandwidth", "2MiB", "--timeout", "5s"],
        "did not finish within 5s",
        |rig, _| {
            wait_precopy(rig, Duration::from_millis(500));
        },
    );
}

/// Nothing in the disk stream notices a dead link by itself (TCP retransmits for ~15 minutes),
/// so it is `--timeout` that ends the migration; the rollback must work with the link down.
#[test]
fn rollback_when_the_network_drops_during_precopy() {
    rollback_case(
        "the network dropped",
        NETWORK_DROP_SECONDS,
        &["--max-bandwidth", "4MiB", "--timeout", "10s"],
        "did not finish within 10s",
        |rig, _| {
            // --timeout counts from row-migrate's start: on a loaded machine its QMP set-up
            // alone took 4.5 s, so the link goes down soon after round 1 starts.
            wait_precopy(rig, Duration::from_millis(500));
            let (ns, dev) = (rig.net.b.clone(), rig.net.veth_b.clone());
            ip(&["-n", &ns, "link", "set", &dev, "down"]);
            eprintln!("[{:5.1}s] link {dev} in {ns} down", rig.secs());
        },
    );
}

#[test]
fn rollback_when_the_destination_qemu_dies_during_the_memory_migration() {
    rollback_case(
        "the destination QEMU killed",
        ROLLBACK_SECONDS,
        &["--max-bandwidth", "8MiB"],
        "memory migration failed",
        |rig, _| {
            let a = rig.a();
            let mon = a.mon.clone();
            let info = wait_until("the memory migration", HANG_LIMIT, || {
                let m = qmp(&mon, "query-migrate", json!({})).ok()?;
                (m["status"] == "active" && m["ram"]["transferred"].as_u64().unwrap_or(0) > 0).then_some(m)
            });
            let phase = rig.a().proxy_migration();
            assert_eq!(phase["phase"], "ready", "the disk should wait at ready while memory moves: {phase}");
            rig.b().kill_qemu();
            eprintln!("[{:5.1}s] killed the destination QEMU during the memory migration: {}", rig.secs(), info["ram"]);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals before anything starts, and runs after a failed one

/// `row-migrate` from A to B with the sockets of the rig's newest sides and the arguments given
/// here (unlike [`Rig::spawn_driver`], no `--tls-creds`, `--mem-uri` or `--json` of its own);
/// `disk_uri` and `dst_proxy` replace the strategy's URI and B's control socket.
fn driver_command(
    rig: &mut Rig,
    strategy: &str,
    disk_uri: Option<&str>,
    dst_proxy: Option<&std::path::Path>,
    args: &[&str],
) -> std::process::Command {
    let (src_qmp, src_ctl) = (rig.a().qmp.clone(), rig.a().ctl.clone());
    let (dst_qmp, dst_ctl) = (rig.b().qmp.clone(), rig.b().ctl.clone());
    let default_uri = if strategy == "qemu-mirror" {
        format!("nbd://{ADDR_B}:{MIRROR_PORT}/{EXPORT}")
    } else {
        format!("tcp:{ADDR_B}:{DISK_PORT}")
    };
    let mut cmd = std::process::Command::new(bin("row-migrate"));
    cmd.arg("--src-qmp").arg(src_qmp).arg("--dst-qmp").arg(dst_qmp);
    cmd.arg("--src-proxy").arg(src_ctl).arg("--dst-proxy").arg(dst_proxy.unwrap_or(&dst_ctl));
    cmd.args(["--disk-uri", disk_uri.unwrap_or(&default_uri), "--strategy", strategy]).args(args);
    cmd
}

/// What a refused run must not change: both QEMUs' run states, migrations, objects and block
/// jobs and nodes, and both proxies' modes and phases.
fn untouched_state(rig: &mut Rig) -> Value {
    let mut state = json!({});
    for host in [HostId::A, HostId::B] {
        let side = rig.side(host);
        let mon = side.mon.clone();
        let ask = |command: &str, args: Value| {
            qmp(&mon, command, args).unwrap_or_else(|e| panic!("{command} on {host:?}'s QEMU: {e}"))
        };
        let mut objects: Vec<String> = ask("qom-list", json!({ "path": "/objects" }))
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap_or_default().to_string())
            .collect();
        objects.sort();
        let mut nodes: Vec<String> = ask("query-named-block-nodes", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap_or_default().to_string())
            .collect();
        nodes.sort();
        let proxy = side.proxy_status();
        let migration = side.proxy_migration();
        state[format!("{host:?}")] = json!({
            "qemu-status": ask("query-status", json!({}))["status"],
            "qemu-migrate": ask("query-migrate", json!({}))["status"],
            "objects": objects,
            "block-jobs": ask("query-block-jobs", json!({})),
            "nodes": nodes,
            "proxy": [proxy["mode"], proxy["incoming"], proxy["incoming-phase"], proxy["writes-refused"]],
            "proxy-phase": migration["phase"],
        });
    }
    state
}

/// Bad flags and a destination proxy that waits for no disk are refused with status 2 and one
/// line, before row-migrate changes anything on either QEMU or proxy; a relative `--tls-creds`
/// is made absolute (QEMU would read it from its own working directory), and the migration
/// then works.
#[test]
fn bad_flags_are_refused_before_anything_changes_and_a_relative_tls_dir_works() {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, MIGRATE_SECONDS);
    let pki = rig.pki.clone();
    let pki_arg = pki.to_str().unwrap().to_string();
    let empty = rig.dir.path().join("empty-pki");
    std::fs::create_dir(&empty).unwrap();
    let partial = rig.dir.path().join("partial-pki");
    std::fs::create_dir(&partial).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.join(f), partial.join(f)).unwrap();
    }
    // Every file there, none a certificate or key: only QEMU can tell.
    let garbage = rig.dir.path().join("garbage-pki");
    std::fs::create_dir(&garbage).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::write(garbage.join(f), "not PEM").unwrap();
    }
    let mem = format!("tcp:{ADDR_B}:{MEM_PORT}");
    // A `serve` proxy with a disk of the same size, given as the destination.
    let serve_dir = rig.dir.path().join("serve");
    std::fs::create_dir(&serve_dir).unwrap();
    let serve_image = serve_dir.join("disk.raw");
    sparse_file(&serve_image, DISK_SIZE);
    let serve_ctl = serve_dir.join("ctl.sock");
    let mut serve = Proc::spawn(
        "serve proxy",
        std::process::Command::new(bin("nbd-row-proxy"))
            .env("NBD_ROW_PROXY_STATE_DIR", state_dir_of(&serve_image))
            .args(["serve", "--image"])
            .arg(&serve_image)
            .arg("--socket")
            .arg(serve_dir.join("nbd.sock"))
            .arg("--control")
            .arg(&serve_ctl),
        &serve_dir.join("proxy.log"),
    );
    serve.wait_for_socket(&serve_ctl);

    let before = untouched_state(&mut rig);
    let (empty_arg, partial_arg) = (empty.to_str().unwrap(), partial.to_str().unwrap());
    let garbage_arg = garbage.to_str().unwrap();
    let row_uri = format!("tcp:{ADDR_B}:{MIRROR_PORT}");
    // (what, strategy, --disk-uri, --dst-proxy, flags, what the line says)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a std::path::Path>, Vec<&'a str>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "a missing --tls-creds",
            "row",
            None,
            None,
            vec!["--tls-creds", "/nonexistent", "--mem-uri", &mem],
            vec!["--tls-creds /nonexistent", "No such file"],
        ),
        (
            "an empty --tls-creds",
            "row",
            None,
            None,
            vec!["--tls-creds", empty_arg, "--mem-uri", &mem],
            vec!["no ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem"],
        ),
        (
            "a --tls-creds without client files",
            "row",
            None,
            None,
            vec!["--tls-creds", partial_arg, "--mem-uri", &mem],
            vec!["no client-cert.pem, client-key.pem"],
        ),
        (
            "a --tls-creds QEMU cannot load",
            "row",
            None,
            None,
            vec!["--tls-creds", garbage_arg, "--mem-uri", &mem],
            vec!["the source QEMU cannot load them as a TLS client"],
        ),
        (
            "a --mem-uri without tcp:",
            "row",
            None,
            None,
            vec!["--tls-creds", &pki_arg, "--mem-uri", "host-b:4444"],
            vec!["--mem-uri", "expected tcp:HOST:PORT"],
        ),
        (
            "a --mem-uri without a port",
            "row",
            None,
            None,
            vec!["--mem-uri", "tcp:host-b"],
            vec!["--mem-uri", "no port"],
        ),
        ("a --mem-uri with a bad port", "row", None, None, vec!["--mem-uri", "tcp:host-b:99999"], vec!["is no port"]),
        (
            "a tcp: --disk-uri for qemu-mirror",
            "qemu-mirror",
            Some(&row_uri),
            None,
            vec!["--mem-uri", &mem],
            vec!["nbd://HOST:PORT/EXPORT"],
        ),
        (
            "a receive proxy for qemu-mirror",
            "qemu-mirror",
            None,
            None,
            vec!["--mem-uri", &mem],
            vec!["it is a `receive` proxy (incoming phase waiting)"],
        ),
        (
            "a serve proxy as the destination",
            "row",
            None,
            Some(&serve_ctl),
            vec!["--mem-uri", &mem],
            vec!["the destination proxy is not waiting for a disk: it is a `serve` proxy (mode direct)"],
        ),
    ];
    for (what, strategy, disk_uri, dst_proxy, args, says) in cases {
        let mut cmd = driver_command(&mut rig, strategy, disk_uri, dst_proxy, &args);
        let started = std::time::Instant::now();
        let out = cmd.output().unwrap();
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("[{:5.1}s] {what}: exit {:?} after {took:?}: {}", rig.secs(), out.status.code(), text.trim_end());
        assert_eq!(out.status.code(), Some(2), "{what}: {text}");
        assert_eq!(text.trim_end().lines().count(), 1, "{what}: one line: {text}");
        assert!(text.starts_with("row-migrate: nothing was changed: "), "{what}: {text}");
        for s in says {
            assert!(text.contains(s), "{what}: does not say {s:?}: {text}");
        }
        assert!(!text.contains("rolled back") && !text.contains('{'), "{what}: {text}");
        assert!(took < Duration::from_secs(5), "{what}: refused only after {took:?}");
        assert_eq!(untouched_state(&mut rig), before, "{what} changed something");
    }
    assert!(serve.terminate(Duration::from_secs(30)).success());

    // A relative --tls-creds, from another directory: the migration works.
    let cwd = rig.dir.path().join("a1");
    let mut cmd = driver_command(&mut rig, "row", None, None, &["--tls-creds", "../pki", "--mem-uri", &mem, "--json"]);
    let out = cmd.current_dir(&cwd).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "with --tls-creds ../pki from {}: {text}", cwd.display());
    let report: Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("a JSON report");
    check_report(&report, "row", Some(3), false);
    let (a, b) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_landed(&mut rig, a, b, true);
}

/// Whether `host`'s QEMU still holds qemu-mirror's job or target node.
fn mirror_leftovers(rig: &mut Rig, host: HostId) -> Vec<String> {
    let mon = rig.side(host).mon.clone();
    let mut left = Vec::new();
    for j in qmp(&mon, "query-block-jobs", json!({})).unwrap().as_array().unwrap() {
        left.push(format!("job {}", j["device"]));
    }
    for n in qmp(&mon, "query-named-block-nodes", json!({})).unwrap().as_array().unwrap() {
        if n["node-name"] == "rowmig-target" {
            left.push("node rowmig-target".into());
        }
    }
    left
}

/// Waits until the source QEMU's mirror job (its QMP monitor `mon`) has copied something.
fn wait_mirror(mon: &std::path::Path) {
    wait_until("the mirror job", HANG_LIMIT, || {
        let jobs = qmp(mon, "query-block-jobs", json!({})).ok()?;
        jobs.as_array()?.iter().any(|j| j["device"] == "rowmig-mirror" && j["offset"].as_u64() > Some(0)).then_some(())
    });
}

/// qemu-mirror after failed runs: a run that times out during the mirror, and one whose
/// destination proxy dies during it, roll back and leave neither the mirror job nor its target
/// node on the source QEMU; a run killed during the mirror leaves both, and the next run
/// removes them; that run then moves the guest.
#[test]
fn qemu_mirror_cleans_up_after_a_failed_run_and_a_retry_migrates() {
    let _serial = serial();
    // Resilient drives: B's QEMU waits for its proxy, which step 2 kills and restarts.
    let guest = Guest { resilient: true, ..Guest::default() };
    let mut rig = Rig::start_with(Role::MirrorTarget, 45, guest, &[]);
    std::thread::sleep(Duration::from_secs(1));
    let key = rig.key.clone();

    // 1. --timeout during the mirror: rolled back, nothing left.
    let res = rig
        .spawn_driver(HostId::A, HostId::B, "qemu-mirror", &["--max-bandwidth", "2MiB", "--timeout", "3s"])
        .wait(HANG_LIMIT);
    eprintln!("[{:5.1}s] mirror with --timeout 3s: exit {:?}: {}", rig.secs(), res.code, res.stderr.trim_end());
    assert_eq!(res.code, Some(3), "stderr:\n{}", res.stderr);
    let errors: Vec<&str> =
        res.stderr.lines().filter(|l| l.starts_with("row-migrate: ") && *l != "row-migrate: rolling back").collect();
    assert_eq!(errors.len(), 1, "one error line:\n{}", res.stderr);
    assert!(errors[0].contains("did not finish within 3s") && errors[0].contains("rolled back"), "{}", errors[0]);
    assert!(!res.stderr.contains("WARN"), "the rollback warned:\n{}", res.stderr);
    assert_eq!(mirror_leftovers(&mut rig, HostId::A), Vec::<String>::new(), "after the rollback");
    assert_eq!(rig.a().qemu_status().as_deref(), Some("running"));
    assert_eq!(rig.b().qemu_status().as_deref(), Some("inmigrate"));

    // 2. The destination proxy killed during the mirror: the job fails, rolled back, nothing left.
    let driver = rig.spawn_driver(HostId::A, HostId::B, "qemu-mirror", &["--max-bandwidth", "2MiB"]);
    let mon = rig.a().mon.clone();
    wait_mirror(&mon);
    rig.b().kill_proxy();
    let res = driver.wait(HANG_LIMIT);
    eprintln!("[{:5.1}s] destination proxy killed: exit {:?}: {}", rig.secs(), res.code, res.stderr.trim_end());
    assert_eq!(res.code, Some(3), "stderr:\n{}", res.stderr);
    let errors: Vec<&str> =
        res.stderr.lines().filter(|l| l.starts_with("row-migrate: ") && *l != "row-migrate: rolling back").collect();
    assert_eq!(errors.len(), 1, "one error line:\n{}", res.stderr);
    assert!(errors[0].contains("mirror") && errors[0].contains("rolled back"), "{}", errors[0]);
    assert!(!errors[0].contains('{'), "raw QEMU JSON in the error: {}", errors[0]);
    assert_eq!(mirror_leftovers(&mut rig, HostId::A), Vec::<String>::new(), "after the rollback");
    assert_eq!(rig.a().qemu_status().as_deref(), Some("running"));
    rig.b().start_proxy(Role::MirrorTarget, &key);

    // 3. Killed during the mirror: the job and the node stay behind.
    let driver = rig.spawn_driver(HostId::A, HostId::B, "qemu-mirror", &["--max-bandwidth", "2MiB"]);
    wait_mirror(&mon);
    signal(driver.pid(), libc::SIGKILL);
    let killed = driver.wait(Duration::from_secs(10));
    assert_eq!(killed.code, None, "row-migrate was not killed: {}", killed.stderr);
    let left = mirror_leftovers(&mut rig, HostId::A);
    eprintln!("[{:5.1}s] row-migrate killed during the mirror; left on A: {left:?}", rig.secs());
    assert!(left.iter().any(|l| l.contains("node")), "the kill left nothing to clean up: {left:?}");

    // 4. The retry removes them and migrates.
    let report = rig.migrate_ok(HostId::A, HostId::B, "qemu-mirror", &[]);
    check_report(&report, "qemu-mirror", None, false);
    let a_left = mirror_leftovers(&mut rig, HostId::A);
    assert_eq!(a_left, Vec::<String>::new(), "after the migration");
    let (a, b) = (index(&rig, HostId::A), index(&rig, HostId::B));
    check_landed(&mut rig, a, b, false);
}
