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

/// Arms A's proxy for a hand-over to B's and waits until the disk is ready.
fn arm(rig: &mut Rig) {
    let uri = format!("tcp:{}:{DISK_PORT}", HostId::B.addr());
    let a = rig.a();
    let mut ctl = ControlClient::connect(&a.ctl);
    ctl.ok("migrate-start", json!({"uri": uri, "strategy": "row", "arm": true}));
    e2e::migration::wait_phase(&mut ctl, "ready", HANG_LIMIT);
}

/// The manager's migration, in libvirt's order; returns the time from the source's stop to
/// the destination's resume as QEMU reports it (its `downtime`, ms).
fn manager_migrates(rig: &mut Rig) -> u64 {
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
    let start = Instant::now();
    loop {
        let m = mon(a, "query-migrate", json!({}));
        match m["status"].as_str().unwrap_or_default() {
            // libvirt continues at once: it has no disk of its own to move.
            "pre-switchover" => {
                mon(a, "migrate-continue", json!({"state": "pre-switchover"}));
            }
            "completed" => return m["downtime"].as_u64().unwrap_or_default(),
            "failed" | "cancelled" => panic!("the memory migration failed: {m}"),
            _ => {}
        }
        assert!(start.elapsed() < HANG_LIMIT, "the memory migration did not complete: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    eprintln!("[{:5.1}s] done", rig.secs());
}
