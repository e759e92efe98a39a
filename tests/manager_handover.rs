//! A VM manager's own live migration moves the local disk: the test plays libvirt with plain
//! QMP and no `row-migrate` in the loop. The source proxy is armed (`migrate-start` with `arm`);
//! then, as libvirt does for a disk on shared storage: the destination QEMU waits with
//! `-incoming defer` and `late-block-activate`, the source sets `pause-before-switchover` and
//! continues from it at once, `migrate` runs to completion, the destination runs and the source
//! QEMU quits. The guest's first write on B takes the disk from A; every block verifies on B.

use std::time::{Duration, Instant};

use e2e::rig::*;
use e2e::*;
use nbd_proto::consts::NBD_EPERM;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

/// How long the guest writes (guest time): long enough to span the migration and its checks.
const SECONDS: u32 = 20;

fn mon(side: &Side, command: &str, args: Value) -> Value {
    qmp(&side.mon, command, args).unwrap_or_else(|e| panic!("{} {command}: {e}", side.name))
}

/// Arms A's proxy for a hand-over to B's with `row-migrate --arm-only` (no QMP socket), which
/// returns once the disk is ready.
fn arm(rig: &mut Rig) {
    let uri = format!("tcp:{}:{DISK_PORT}", HostId::B.addr());
    let (src, dst) = (rig.a().ctl.clone(), rig.b().ctl.clone());
    let out = std::process::Command::new(bin("row-migrate"))
        .arg("--arm-only")
        .arg("--src-proxy")
        .arg(&src)
        .arg("--dst-proxy")
        .arg(&dst)
        .args(["--disk-uri", &uri, "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "row-migrate --arm-only: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["armed"], true, "{report}");
    assert_eq!(report["disks"][0]["status"]["phase"], "ready", "{report}");
    let mut ctl = ControlClient::connect(&rig.a().ctl);
    assert_eq!(ctl.ok("query-migrate", json!({}))["phase"], "ready");
    // Arming again is refused before anything changes: B no longer waits for a disk.
    let again = std::process::Command::new(bin("row-migrate"))
        .arg("--arm-only")
        .arg("--src-proxy")
        .arg(&src)
        .arg("--dst-proxy")
        .arg(&dst)
        .args(["--disk-uri", &uri])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{}", String::from_utf8_lossy(&again.stderr));
}

/// The manager starts its migration, in libvirt's order.
fn manager_starts(rig: &mut Rig) {
    let mem_uri = format!("tcp:{}:{MEM_PORT}", HostId::B.addr());
    let b = rig.b();
    mon(b, "migrate-set-capabilities", json!({"capabilities": [{"capability": "late-block-activate", "state": true}]}));
    mon(b, "migrate-incoming", json!({"uri": format!("tcp:0.0.0.0:{MEM_PORT}")}));
    let a = rig.a();
    mon(
        a,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    mon(a, "migrate", json!({"uri": mem_uri}));
}

/// Waits for the source QEMU's migration to reach `status`; at `pre-switchover` continues at
/// once (as libvirt does: it has no disk of its own to move) unless that is what it waits for.
fn manager_waits(rig: &mut Rig, status: &str) -> Value {
    let a = rig.a();
    let start = Instant::now();
    loop {
        let m = mon(a, "query-migrate", json!({}));
        let now = m["status"].as_str().unwrap_or_default();
        if now == status {
            return m;
        }
        match now {
            "pre-switchover" => {
                mon(a, "migrate-continue", json!({"state": "pre-switchover"}));
            }
            "failed" | "cancelled" => panic!("the memory migration failed: {m}"),
            _ => {}
        }
        assert!(start.elapsed() < HANG_LIMIT, "the memory migration did not reach {status}: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The manager's whole migration; returns QEMU's `downtime` (ms).
fn manager_migrates(rig: &mut Rig) -> u64 {
    manager_starts(rig);
    manager_waits(rig, "completed")["downtime"].as_u64().unwrap_or_default()
}

/// After an abandoned hand-over: A's guest still writes to A's disk, which A's proxy still
/// holds (writes accepted) and B never served; once B's QEMU has been gone for B's
/// `--abandoned-after` (10 s), A disarms by itself, B discards the session, and A verifies
/// every block.
fn disk_stays_on_a(rig: &mut Rig) {
    let a = rig.a();
    assert!(a.proxy_status()["writes-refused"].is_null(), "{}", a.proxy_status());
    let mut ctl = ControlClient::connect(&a.ctl);
    e2e::migration::wait_phase(&mut ctl, "cancelled", HANG_LIMIT);
    let log = read_text(&rig.a().image.with_file_name("proxy.log"));
    assert!(log.contains("abandoned the migration"), "A's proxy log:\n{log}");
    wait_until("B discarded the session", HANG_LIMIT, || {
        (rig.b().proxy_status()["incoming-phase"] == "waiting").then_some(())
    });
    let text = rig.a().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on A; console:\n{text}");
    wait_until("A's overlay merged back", HANG_LIMIT, || (rig.a().proxy_status()["mode"] == "direct").then_some(()));
}

#[test]
fn a_manager_s_live_migration_hands_the_disk_over_on_the_destination_s_first_write() {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, SECONDS);
    std::thread::sleep(Duration::from_secs(2));
    arm(&mut rig);
    eprintln!("[{:5.1}s] armed", rig.secs());
    let downtime = manager_migrates(&mut rig);
    eprintln!("[{:5.1}s] memory migrated, QEMU's downtime {downtime} ms", rig.secs());
    // The destination runs the guest (with -S a manager would `cont` it now).
    let b = rig.b();
    if b.qemu_status().as_deref() != Some("running") {
        mon(b, "cont", json!({}));
    }
    // The source QEMU is done: the manager ends it.
    let a = rig.a();
    let _ = qmp(&a.mon, "quit", json!({}));
    // The guest verifies every block on B and goes on writing there.
    let text = rig.b().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on B; console:\n{text}");
    assert!(text.contains("WORKLOAD written="), "the guest did not write on B:\n{text}");
    // A handed its disk over and refuses writes; it completes once B holds every block.
    let a = rig.a();
    let mut c = RawClient::connect(&a.nbd, EXPORT, true).unwrap();
    let reply = c.call(request(Cmd::Write, 1, 0, 4096), &[7; 4096]).unwrap();
    assert_eq!(reply.error, NBD_EPERM, "A accepted a write after the hand-over");
    let mut ctl = ControlClient::connect(&a.ctl);
    e2e::migration::wait_phase(&mut ctl, "completed", HANG_LIMIT);
    let status = rig.b().proxy_status();
    assert_eq!(status["incoming-phase"], "owner", "{status}");
    wait_until("B holds every block", HANG_LIMIT, || (rig.b().proxy_status()["incoming"] == false).then_some(()));
    // The cold data moved too.
    use std::os::unix::fs::FileExt;
    let (mut x, mut y) = (vec![0u8; DATA_LEN as usize], vec![0u8; DATA_LEN as usize]);
    std::fs::File::open(&rig.a().image).unwrap().read_exact_at(&mut x, DATA_OFFSET).unwrap();
    std::fs::File::open(&rig.b().image).unwrap().read_exact_at(&mut y, DATA_OFFSET).unwrap();
    assert!(x == y, "the data outside the guest's area differs between A and B");
    let log = read_text(&rig.a().image.with_file_name("proxy.log"));
    assert!(log.contains("handing the disk over"), "A's proxy log:\n{log}");
    // What the guest's first write on B waited for: the final round and the commit.
    let commit = log.lines().find(|l| l.contains("confirmed the commit")).unwrap_or_default();
    eprintln!("[{:5.1}s] B's first write waited for: {commit}", rig.secs());
    eprintln!("[{:5.1}s] done", rig.secs());
}

#[test]
fn a_manager_migration_aborted_before_the_switchover_leaves_the_disk_on_a() {
    let _serial = serial();
    let mut rig = Rig::start(Role::Receive, SECONDS);
    std::thread::sleep(Duration::from_secs(2));
    arm(&mut rig);
    manager_starts(&mut rig);
    manager_waits(&mut rig, "pre-switchover");
    // `virsh domjobabort`: QEMU cancels and the guest runs on A again.
    let a = rig.a();
    mon(a, "migrate_cancel", json!({}));
    wait_until("A runs again", HANG_LIMIT, || (rig.a().qemu_status().as_deref() == Some("running")).then_some(()));
    // The manager ends the destination QEMU of its failed migration.
    rig.b().kill_qemu();
    disk_stays_on_a(&mut rig);
}

#[test]
fn the_destination_qemu_killed_before_it_runs_leaves_the_disk_on_a() {
    let _serial = serial();
    let guest = Guest { paused_incoming: true, ..Guest::default() };
    let mut rig = Rig::start_with(Role::Receive, SECONDS, guest, &[]);
    std::thread::sleep(Duration::from_secs(2));
    arm(&mut rig);
    manager_migrates(&mut rig);
    // B waits paused (libvirt would `cont` it now); it dies instead, and the manager resumes A.
    rig.b().kill_qemu();
    let a = rig.a();
    mon(a, "cont", json!({}));
    wait_until("A runs again", HANG_LIMIT, || (rig.a().qemu_status().as_deref() == Some("running")).then_some(()));
    disk_stays_on_a(&mut rig);
}

#[test]
fn the_destination_proxy_killed_after_its_first_write_comes_back_owning_the_disk() {
    let _serial = serial();
    // The drive waits for a restarted proxy and pauses the guest on an I/O error.
    let guest = Guest { resilient: true, ..Guest::default() };
    let mut rig = Rig::start_with(Role::Receive, SECONDS, guest, &[]);
    std::thread::sleep(Duration::from_secs(2));
    arm(&mut rig);
    manager_migrates(&mut rig);
    let _ = qmp(&rig.a().mon, "quit", json!({}));
    wait_until("B owns the disk", HANG_LIMIT, || (rig.b().proxy_status()["incoming-phase"] == "owner").then_some(()));
    // B's proxy dies with the guest writing; it comes back from its record.
    let key = rig.key.clone();
    let b = rig.b();
    b.kill_proxy();
    std::thread::sleep(Duration::from_secs(1));
    b.start_proxy(Role::Receive, &key);
    let status = b.proxy_status();
    assert_eq!(status["incoming-phase"], "owner", "B owns the disk after its restart: {status}");
    // A guest paused on the I/O error goes on (a manager would `cont` it too).
    wait_until("B's guest runs", HANG_LIMIT, || {
        let b = rig.b();
        match b.qemu_status().as_deref() {
            Some("running") => Some(()),
            Some("io-error" | "paused") => {
                let _ = qmp(&b.mon, "cont", json!({}));
                None
            }
            _ => None,
        }
    });
    let text = rig.b().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on B; console:\n{text}");
    // A is fenced and completes once B holds every block.
    let mut ctl = ControlClient::connect(&rig.a().ctl);
    e2e::migration::wait_phase(&mut ctl, "completed", HANG_LIMIT);
    let mut c = RawClient::connect(&rig.a().nbd, EXPORT, true).unwrap();
    assert_eq!(c.call(request(Cmd::Write, 1, 0, 4096), &[7; 4096]).unwrap().error, NBD_EPERM);
}

#[test]
fn the_source_proxy_killed_during_the_push_resumes_it_and_nothing_is_lost() {
    let _serial = serial();
    // The push waits 3 s after the hand-over, so the source can be killed while B misses blocks.
    let mut rig = Rig::start_with(Role::Receive, SECONDS, Guest::default(), &[("NBD_ROW_PAUSE", "postcopy-push:3000")]);
    std::thread::sleep(Duration::from_secs(2));
    arm(&mut rig);
    manager_migrates(&mut rig);
    let _ = qmp(&rig.a().mon, "quit", json!({}));
    wait_until("B owns the disk", HANG_LIMIT, || (rig.b().proxy_status()["incoming-phase"] == "owner").then_some(()));
    let missing = rig.b().proxy_status()["postcopy"]["missing-blocks"].as_u64().unwrap_or(0);
    eprintln!("[{:5.1}s] B owns the disk, {missing} blocks still on A: killing A's proxy", rig.secs());
    let key = rig.key.clone();
    let a = rig.a();
    a.kill_proxy();
    a.start_proxy(Role::Source, &key);
    let status = a.proxy_status();
    assert!(status["writes-refused"].is_string(), "A restarts fenced: {status}");
    wait_until("B holds every block", HANG_LIMIT, || (rig.b().proxy_status()["incoming"] == false).then_some(()));
    let text = rig.b().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "verification failed on B; console:\n{text}");
    // The record says the hand-over was claimed: the restarted source completes by itself.
    let mut ctl = ControlClient::connect(&rig.a().ctl);
    e2e::migration::wait_phase(&mut ctl, "completed", HANG_LIMIT);
}

/// A QEMU's events, read on its second monitor (the one `row-migrate` uses) from a thread,
/// until [`Events::stop`].
struct Events {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<qmp_proto::Event>>,
}

impl Events {
    fn watch(side: &Side) -> Self {
        let path = side.qmp.clone();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut client = qmp_proto::Client::connect(&path, HANG_LIMIT).await.unwrap();
                let mut seen = Vec::new();
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    match client.next_event(Duration::from_millis(100)).await {
                        Ok(Some(event)) => seen.push(event),
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
                seen
            })
        });
        Self { done, thread }
    }

    fn stop(self) -> Vec<qmp_proto::Event> {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Seconds since the epoch of the first `name` among `events`.
fn event_at(events: &[qmp_proto::Event], name: &str) -> f64 {
    let e = events.iter().find(|e| e.event == name).unwrap_or_else(|| panic!("no {name} among {events:?}"));
    e.timestamp.seconds as f64 + e.timestamp.microseconds as f64 / 1e6
}

/// The manager's migration as [`manager_migrates`], timed from outside: the source's STOP to the
/// destination's RESUME (ms, from QEMU's event timestamps: one clock, one machine), and QEMU's
/// own `downtime`.
fn manager_migrates_timed(rig: &mut Rig) -> (f64, u64) {
    let (on_a, on_b) = (Events::watch(rig.a()), Events::watch(rig.b()));
    let counted = manager_migrates(rig);
    wait_until("B's guest running", HANG_LIMIT, || (rig.b().qemu_status().as_deref() == Some("running")).then_some(()));
    let (a, b) = (on_a.stop(), on_b.stop());
    ((event_at(&b, "RESUME") - event_at(&a, "STOP")) * 1000.0, counted)
}

/// The median of `values`.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Figures, not a check: the same guest (writing 200 writes/s) migrated three ways, one after
/// the other, `FIGURES_RUNS` times (default 3), on an unlimited and a 100 Mbit/s link: by the
/// manager's QMP sequence on shared storage (B's QEMU opens A's disk through A's proxy), by the
/// same sequence with the hand-over, and by `row-migrate`. Printed for each run: the downtime from
/// the source's STOP to the destination's RESUME, QEMU's own count, and what B's first write
/// waited for in the hand-over; then the medians.
#[test]
#[ignore = "figures, not a check: cargo test -p e2e --test manager_handover -- --ignored --nocapture"]
fn downtime_beside_a_shared_storage_migration() {
    let _serial = serial();
    let runs: usize = std::env::var("FIGURES_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let links: Vec<Option<String>> = std::env::var("FIGURES_LINKS")
        .map(|l| l.split(',').map(|s| (s != "unlimited").then(|| s.to_string())).collect())
        .unwrap_or_else(|_| vec![None, Some("100mbit".to_string())]);
    for link in links {
        let name = link.clone().unwrap_or_else(|| "unlimited".to_string());
        let start = || Rig::start_on_link(Role::Receive, SECONDS, Guest::default(), &[], link.as_deref());
        let (mut shared, mut handover, mut driven) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=runs {
            let (ms, counted) = {
                let mut rig = start();
                std::thread::sleep(Duration::from_secs(2));
                // B's QEMU on A's disk: the plain shared-storage migration a manager makes.
                rig.b().kill_qemu();
                let a_nbd = rig.a().nbd.clone();
                let b = rig.b();
                b.nbd = a_nbd;
                b.start_qemu(SECONDS, true);
                let timed = manager_migrates_timed(&mut rig);
                let text = rig.b().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
                assert!(text.contains("WORKLOAD-VERIFY-OK"), "shared storage: verification failed on B:\n{text}");
                timed
            };
            println!("FIGURES link {name} run {run}: shared storage {ms:.0} ms (QEMU counted {counted} ms)");
            shared.push(ms);
            let (ms, counted, waited) = {
                let mut rig = start();
                std::thread::sleep(Duration::from_secs(2));
                arm(&mut rig);
                let (ms, counted) = manager_migrates_timed(&mut rig);
                let _ = qmp(&rig.a().mon, "quit", json!({}));
                let text = rig.b().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
                assert!(text.contains("WORKLOAD-VERIFY-OK"), "hand-over: verification failed on B:\n{text}");
                let log = read_text(&rig.a().image.with_file_name("proxy.log"));
                let waited = log
                    .lines()
                    .find(|l| l.contains("confirmed the commit"))
                    .and_then(|l| l.split("round_ms=").nth(1))
                    .unwrap_or("?")
                    .to_string();
                (ms, counted, waited)
            };
            println!(
                "FIGURES link {name} run {run}: hand-over {ms:.0} ms (QEMU counted {counted} ms; B's first write \
                 waited {waited} ms)"
            );
            handover.push(ms);
            let report = {
                let mut rig = start();
                std::thread::sleep(Duration::from_secs(2));
                let report = rig.migrate_ok(HostId::A, HostId::B, "row", &[]);
                let text = rig.b().wait_console("WORKLOAD-VERIFY-", HANG_LIMIT);
                assert!(text.contains("WORKLOAD-VERIFY-OK"), "row-migrate: verification failed on B:\n{text}");
                report
            };
            let ms = report["downtime-ms"].as_f64().unwrap_or(f64::NAN);
            println!(
                "FIGURES link {name} run {run}: row-migrate {ms:.0} ms (QEMU counted {} ms; final disk round {:.0} ms; \
                 memory paced at {})",
                report["qemu-reported-downtime-ms"],
                report["final-disk-round-ms"].as_f64().unwrap_or(f64::NAN),
                report["memory-max-bandwidth"]
            );
            driven.push(ms);
        }
        let (s, h, d) = (median(&mut shared), median(&mut handover), median(&mut driven));
        println!(
            "FIGURES link {name}, medians of {runs}: shared storage {s:.0} ms, hand-over {h:.0} ms ({:+.0}), \
             row-migrate {d:.0} ms ({:+.0})",
            h - s,
            d - s
        );
    }
}
