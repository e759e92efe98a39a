//! A VM with two disks, end to end: a TCG guest on host A runs `row-workload` on /dev/vda and
//! /dev/vdb at once (each disk behind its own proxy), and one `row-migrate` moves the guest and
//! both disks to host B (`--src-proxy/--dst-proxy/--disk-uri` for the first, `--disk` for the
//! second). The guest verifies both disks on B.
//!
//! The fault case cuts the second disk's destination while the first has already committed its
//! final round: row-migrate must roll back *both* disks (the first destination's commit is
//! revoked before the guest resumes on A), and the guest verifies both disks on A.

use std::time::Duration;

use e2e::rig::*;
use e2e::*;
use nbd_proto::consts::NBD_EPERM;
use nbd_proto::Command as Cmd;
use serde_json::Value;

/// Where the second disk's stream goes on B.
const SECOND_DISK_PORT: u16 = 10811;
/// How long the guest writes (guest time): long enough to span the migration or the rollback.
const SECONDS: u32 = 15;

/// The two-host rig with a second disk per host: `rig` holds disk 1 and the QEMUs, `a2`/`b2`
/// are the second disk's proxies (no QEMU of their own).
struct TwoDisks {
    rig: Rig,
    a2: Side,
    b2: Side,
}

impl Drop for TwoDisks {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== second disk's proxies\n{}{}=====", self.a2.logs(), self.b2.logs());
        }
        // The QEMUs go first (they hold NBD connections to every proxy); Rig's own drop follows.
        for s in &mut self.rig.sides {
            s.kill_qemu();
        }
    }
}

impl TwoDisks {
    /// Both hosts with two disks each; A's guest writes both; `a2_env` goes to A's second proxy.
    fn start(a2_env: &[(&str, &str)]) -> Self {
        let t0 = std::time::Instant::now();
        let net = TwoHosts::create(None);
        let dir = tempfile::tempdir().unwrap();
        let key = migration::key_file(dir.path(), "two-disk-test-key-0123456789abcdef0123");
        let pki = lab_pki(&dir.path().join("pki"));
        let mut a = Side::new(HostId::A, &net.a, dir.path(), "a1");
        let mut b = Side::new(HostId::B, &net.b, dir.path(), "b1");
        let mut a2 = Side::new(HostId::A, &net.a, dir.path(), "a1-disk2");
        let mut b2 = Side::new(HostId::B, &net.b, dir.path(), "b1-disk2");
        b2.disk_port = SECOND_DISK_PORT;
        a2.proxy_env = a2_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        for (i, side) in [&mut a, &mut b, &mut a2, &mut b2].into_iter().enumerate() {
            side.tls_creds = Some(pki.clone());
            sparse_file(&side.image, DISK_SIZE);
            if side.host == HostId::A {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&side.image).unwrap();
                f.write_all_at(&random_bytes(0x5eed + i as u64, DATA_LEN as usize), DATA_OFFSET).unwrap();
            }
        }
        a.start_proxy(Role::Source, &key);
        a2.start_proxy(Role::Source, &key);
        b.start_proxy(Role::Receive, &key);
        b2.start_proxy(Role::Receive, &key);
        a.second_disk = Some(a2.nbd.clone());
        b.second_disk = Some(b2.nbd.clone());
        let mut rig =
            Rig { sides: vec![a, b], net, key, pki, dir, t0, driver_logs: Vec::new(), driver_env: Vec::new() };
        rig.a().start_qemu(SECONDS, false);
        rig.b().start_qemu(SECONDS, true);
        let text = rig.a().wait_console("WORKLOAD-START", HANG_LIMIT);
        eprintln!("[{:5.1}s] guest booted on A", rig.secs());
        // Both workloads started (each prints its device).
        wait_until("both workloads to start", HANG_LIMIT, || {
            let text = rig.a().console_text();
            (text.contains("device=/dev/vda") && text.contains("device=/dev/vdb")).then_some(())
        });
        drop(text);
        Self { rig, a2, b2 }
    }

    /// The `--disk` value of the second disk.
    fn second_disk_arg(&self) -> String {
        format!(
            "src={},dst={},uri=tcp:{}:{SECOND_DISK_PORT}",
            self.a2.ctl.display(),
            self.b2.ctl.display(),
            HostId::B.addr()
        )
    }
}

/// Counts the workloads that verified on `side`'s console (waiting for both to finish).
fn wait_both_verified(side: &mut Side) -> String {
    let text = wait_until("both workloads to verify", HANG_LIMIT, || {
        let text = side.console_text();
        let done = text.matches("WORKLOAD-VERIFY-").count();
        (done >= 2 || side.qemu_status().is_none()).then_some(text)
    });
    assert!(!text.contains("WORKLOAD-VERIFY-FAIL"), "a disk failed to verify on {}:\n{text}", side.name);
    assert_eq!(text.matches("WORKLOAD-VERIFY-OK").count(), 2, "both disks must verify on {}:\n{text}", side.name);
    text
}

/// A source proxy that handed its disk over refuses writes.
fn refuses_writes(side: &Side) {
    let mut c = RawClient::connect(&side.nbd, EXPORT, true).unwrap();
    let reply = c.call(request(Cmd::Write, 1, 0, 4096), &[7; 4096]).unwrap();
    assert_eq!(reply.error, NBD_EPERM, "the source proxy {} accepted a write after the migration", side.name);
}

#[test]
fn one_row_migrate_moves_a_guest_with_two_disks() {
    let _serial = serial();
    let mut t = TwoDisks::start(&[]);
    std::thread::sleep(Duration::from_secs(2));
    let second = t.second_disk_arg();
    let report = t.rig.migrate_ok(HostId::A, HostId::B, "row", &["--disk", &second, "--verify-disk"]);
    assert_eq!(report["disk-count"], 2, "{report}");
    let disks = report["disk"].as_array().unwrap_or_else(|| panic!("one report per disk: {report}"));
    assert_eq!(disks.len(), 2, "{report}");
    for d in disks {
        let rounds = d["rounds"].as_array().unwrap_or_else(|| panic!("rounds: {report}"));
        assert_eq!(rounds.last().unwrap()["kind"], "final", "{report}");
        assert!(rounds[0]["logical-bytes"].as_u64().unwrap_or(0) >= DATA_LEN, "round 1: {report}");
    }
    assert_eq!(report["disk-verified"].as_array().map(Vec::len), Some(2), "{report}");
    eprintln!(
        "[{:5.1}s] two disks: total {:.1} s, downtime {:.0} ms (final rounds {:.0} ms)",
        t.rig.secs(),
        report["total-seconds"].as_f64().unwrap_or(0.0),
        report["downtime-ms"].as_f64().unwrap_or(0.0),
        report["final-disk-round-ms"].as_f64().unwrap_or(0.0)
    );
    println!("REPORT two-disks: {report}");
    // The guest runs on B and verifies both disks there; both sources refuse writes.
    assert_eq!(t.rig.b().qemu_status().as_deref(), Some("running"));
    assert_ne!(t.rig.a().qemu_status().as_deref(), Some("running"));
    let text = wait_both_verified(t.rig.b());
    assert!(text.contains("WORKLOAD written="), "the guest did not write on B:\n{text}");
    refuses_writes(&t.rig.sides[0]);
    refuses_writes(&t.a2);
    for d in [&t.rig.sides[1], &t.b2] {
        let st = d.proxy_status();
        assert_eq!(st["incoming"], false, "destination proxy {}: {st}", d.name);
    }
    // Cold data moved with each disk.
    use std::os::unix::fs::FileExt;
    for (s, d) in [(&t.rig.sides[0], &t.rig.sides[1]), (&t.a2, &t.b2)] {
        let (mut x, mut y) = (vec![0u8; DATA_LEN as usize], vec![0u8; DATA_LEN as usize]);
        std::fs::File::open(&s.image).unwrap().read_exact_at(&mut x, DATA_OFFSET).unwrap();
        std::fs::File::open(&d.image).unwrap().read_exact_at(&mut y, DATA_OFFSET).unwrap();
        assert!(x == y, "the data outside the guest's area differs between {} and {}", s.name, d.name);
    }
}

#[test]
fn a_dead_link_on_one_disk_rolls_back_both() {
    let _serial = serial();
    // The second disk's final round waits 4 s before sending: time to cut its destination while
    // the first disk has already committed.
    let mut t = TwoDisks::start(&[("NBD_ROW_PAUSE", "final-round:4000")]);
    std::thread::sleep(Duration::from_secs(1));
    let second = t.second_disk_arg();
    let driver = t.rig.spawn_driver(HostId::A, HostId::B, "row", &["--disk", &second]);
    let b1 = t.rig.sides[1].ctl.clone();
    wait_until("the first disk to commit", HANG_LIMIT, || {
        let st = qmp(&b1, "query-status", serde_json::json!({})).ok()?;
        let phase = st["incoming-phase"].as_str().unwrap_or_default().to_string();
        (phase == "committed" || phase == "owner").then_some(())
    });
    eprintln!("[{:5.1}s] disk 1 committed; killing disk 2's destination proxy", t.rig.secs());
    t.b2.kill_proxy();
    let res = driver.wait(HANG_LIMIT);
    eprintln!("[{:5.1}s] row-migrate exited {:?}; stderr:\n{}", t.rig.secs(), res.code, res.stderr.trim_end());
    assert_eq!(res.code, Some(3), "rolled back, the guest runs on the source; stderr:\n{}", res.stderr);
    assert!(res.stderr.contains("disk 2"), "the message names the failing disk:\n{}", res.stderr);
    let report: Value = serde_json::from_str(res.stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(report["state"]["disks"].as_array().map(Vec::len), Some(2), "{report}");
    // Both disks are A's again: its proxies take writes, nothing migrates; B's first proxy no
    // longer owns the disk it had committed, and B's guest never ran.
    for s in [&t.rig.sides[0], &t.a2] {
        let st = s.proxy_status();
        assert!(st["writes-refused"].is_null(), "source proxy {} still refuses writes: {st}", s.name);
        let m = s.proxy_migration();
        assert!(matches!(m["phase"].as_str(), Some("idle" | "cancelled" | "failed")), "{}: {m}", s.name);
    }
    let st = t.rig.sides[1].proxy_status();
    assert!(!matches!(st["incoming-phase"].as_str(), Some("committed" | "owner")), "B's first proxy: {st}");
    assert_ne!(t.rig.b().qemu_status().as_deref(), Some("running"), "B's guest resumed");
    assert_eq!(t.rig.a().qemu_status().as_deref(), Some("running"), "A's guest does not run");
    wait_both_verified(t.rig.a());
}
