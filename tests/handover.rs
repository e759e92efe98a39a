//! The hand-over that follows someone else's live migration (a VM manager's): the source proxy
//! is armed (`migrate-start` with `arm`), and the destination's first write (its guest runs: the
//! source QEMU is inactive) takes the disk. Checked against the real binaries over a real
//! migration stream: reads on the destination before the hand-over see the source's current
//! data; the write is held until the commit and lands; the source refuses writes from then on
//! and completes by itself once the destination holds every block; an unarmed source refuses.

use std::time::{Duration, Instant};

use e2e::migration::*;
use e2e::*;
use nbd_proto::consts::NBD_EPERM;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

const KEY: &str = "handover-test-key-0123456789abcdef";

fn write(server: &Server, offset: u64, data: &[u8]) -> u32 {
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let error = c.call(request(Cmd::Write, 1, offset, data.len() as u32), data).unwrap().error;
    if error == 0 {
        assert_eq!(c.call(request(Cmd::Flush, 2, 0, 0), &[]).unwrap().error, 0, "flush");
    }
    error
}

fn read(server: &Server, offset: u64, len: u32) -> Vec<u8> {
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let r = c.call(request(Cmd::Read, 1, offset, len), &[]).unwrap();
    assert_eq!(r.error, 0, "read at {offset}");
    r.data
}

fn status(host: &Host) -> Value {
    host.ctl().ok("query-status", json!({}))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < HANG_LIMIT, "{what} not reached");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Pair {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    src: Host,
    dst: Host,
    port: u16,
    data: Vec<u8>,
}

fn pair(seed: u64) -> Pair {
    pair_with(seed, &[])
}

/// A pair whose destination also gets `dst_args`.
fn pair_with(seed: u64, dst_args: &[&str]) -> Pair {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = key_file(src_dir.path(), KEY);
    let (image, data) = source_image(src_dir.path(), seed);
    let src = source(src_dir.path(), &image, &key);
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let mut args = vec!["--auth-key-file", key.to_str().unwrap()];
    args.extend_from_slice(dst_args);
    let dst = destination_with(dst_dir.path(), &dst_image, &args, port);
    Pair { _dirs: (src_dir, dst_dir), src, dst, port, data }
}

impl Pair {
    fn start(&self, arm: bool) {
        let mut ctl = self.src.ctl();
        let uri = format!("tcp:127.0.0.1:{}", self.port);
        ctl.ok("migrate-start", json!({"uri": uri, "strategy": "row", "arm": arm}));
        wait_phase(&mut ctl, "ready", HANG_LIMIT);
    }
}

#[test]
fn the_destination_s_first_write_takes_an_armed_disk() {
    let p = pair(21);
    p.start(true);
    let mut want = p.data.clone();
    // The guest still runs on A: its writes land there, and B's reads see them at once.
    assert_eq!(write(&p.src.server, 0, &[0xa1; 4096]), 0);
    want[..4096].fill(0xa1);
    assert_eq!(read(&p.dst.server, 0, 4096), vec![0xa1; 4096], "a read on B before the hand-over");
    assert_eq!(status(&p.dst)["incoming-phase"], "receiving");
    // Writes after the last round that the hand-over must carry (by post-copy).
    for i in 0..64u64 {
        let offset = (1 << 20) + i * 40960;
        assert_eq!(write(&p.src.server, offset, &[0xa2; 4096]), 0);
        want[offset as usize..offset as usize + 4096].fill(0xa2);
    }

    // The VM manager migrated the guest: B's first write takes the disk.
    assert_eq!(write(&p.dst.server, 8192, &[0xb1; 4096]), 0, "the write on B after the claim");
    want[8192..12288].fill(0xb1);
    assert_eq!(status(&p.dst)["incoming-phase"], "owner");
    assert_eq!(write(&p.src.server, 0, &[0xa9; 4096]), NBD_EPERM, "A writes after the hand-over");
    assert!(status(&p.src)["writes-refused"].is_string());
    // A completes by itself once B holds every block.
    let mut ctl = p.src.ctl();
    wait_phase(&mut ctl, "completed", HANG_LIMIT);
    wait_for("B holds every block", || status(&p.dst)["incoming"] == false);
    assert!(read_all(&p.dst.server) == want, "B's disk differs from A's with B's write");
    let log = p.src.server.proc.log_text();
    assert!(log.contains("handing the disk over"), "{log}");
}

#[test]
fn an_armed_source_keeps_sending_what_the_guest_has_finished_with() {
    let p = pair(23);
    let mut ctl = p.src.ctl();
    let uri = format!("tcp:127.0.0.1:{}", p.port);
    // No final-round budget: every block the guest has finished with goes in the next pass.
    ctl.ok("migrate-start", json!({"uri": uri, "strategy": "row", "arm": true, "final-budget-ms": 0}));
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    let rounds_before = ctl.ok("query-migrate", json!({}))["rounds"].as_array().unwrap().len();
    let mut want = p.data.clone();
    for i in 0..64u64 {
        let offset = (2 << 20) + i * 40960;
        assert_eq!(write(&p.src.server, offset, &[0xa4; 4096]), 0);
        want[offset as usize..offset as usize + 4096].fill(0xa4);
    }
    // A pass within a couple of seconds carries them, while A still owns the disk.
    wait_for("an update pass while armed", || {
        let m = ctl.ok("query-migrate", json!({}));
        let rounds = m["rounds"].as_array().unwrap();
        rounds.len() > rounds_before
            && rounds.iter().skip(rounds_before).map(|r| r["blocks"].as_u64().unwrap()).sum::<u64>() >= 64
    });
    assert_eq!(ctl.ok("query-migrate", json!({}))["phase"], "ready");
    // The claim then has nothing left for post-copy: A completes at once.
    assert_eq!(write(&p.dst.server, 0, &[0xb3; 4096]), 0);
    want[..4096].fill(0xb3);
    wait_phase(&mut ctl, "completed", HANG_LIMIT);
    let m = ctl.ok("query-migrate", json!({}));
    assert!(m["postcopy"].is_null() || m["postcopy"]["blocks"] == 0, "{m}");
    assert!(read_all(&p.dst.server) == want);
}

/// A VM manager's switchover may come at any moment: an armed pass never sends more than
/// about 100 ms of data at the planning rate (at least 1 MiB), and what it leaves goes in the
/// next passes.
#[test]
fn armed_passes_are_short_and_the_rest_follows() {
    let p = pair(27);
    let mut ctl = p.src.ctl();
    let uri = format!("tcp:127.0.0.1:{}", p.port);
    // 8 MiB/s: a pass may carry about 800 KiB, so the 1 MiB floor (256 blocks) applies.
    let start = json!({"uri": uri, "strategy": "row", "arm": true, "final-budget-ms": 0, "max-bandwidth": 8 << 20});
    ctl.ok("migrate-start", start);
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    let rounds_before = ctl.ok("query-migrate", json!({}))["rounds"].as_array().unwrap().len();
    let mut want = p.data.clone();
    // 6 MiB the guest has finished with, in 24 writes of 256 KiB.
    for i in 0..24u64 {
        let offset = (16 << 20) + i * (256 << 10);
        let data = vec![0x40 + i as u8; 256 << 10];
        let mut c = RawClient::connect(&p.src.server.socket, "", true).unwrap();
        assert_eq!(c.call(request(Cmd::Write, 1, offset, data.len() as u32), &data).unwrap().error, 0);
        assert_eq!(c.call(request(Cmd::Flush, 2, 0, 0), &[]).unwrap().error, 0);
        want[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    let passes = |ctl: &mut ControlClient| -> Vec<u64> {
        let m = ctl.ok("query-migrate", json!({}));
        m["rounds"].as_array().unwrap().iter().skip(rounds_before).map(|r| r["blocks"].as_u64().unwrap()).collect()
    };
    wait_for("every written block sent in armed passes", || passes(&mut ctl).iter().sum::<u64>() >= 1536);
    let sent = passes(&mut ctl);
    assert!(sent.len() >= 6, "1,536 blocks in {} passes: {sent:?}", sent.len());
    assert!(sent.iter().all(|&b| b <= 256), "a pass over 256 blocks: {sent:?}");
    // The claim then leaves nothing for post-copy, and B holds the disk as A had it.
    assert_eq!(write(&p.dst.server, 0, &[0xb4; 4096]), 0);
    want[..4096].fill(0xb4);
    wait_phase(&mut ctl, "completed", HANG_LIMIT);
    assert!(read_all(&p.dst.server) == want);
}

#[test]
fn an_unarmed_source_refuses_the_destination_s_claim() {
    let p = pair(22);
    p.start(false);
    let started = Instant::now();
    assert_eq!(write(&p.dst.server, 0, &[0xb2; 4096]), NBD_EPERM);
    assert!(started.elapsed() < e2e_claim_wait(), "the refusal came only after the claim's wait");
    assert_eq!(p.src.ctl().ok("query-migrate", json!({}))["phase"], "ready");
    assert_eq!(write(&p.src.server, 0, &[0xa3; 4096]), 0, "A keeps its disk");
    assert!(p.dst.server.proc.log_text().contains("not armed"), "B says why");
    // Asked again, refused again; the session goes on and a migrate-finish still works.
    assert_eq!(write(&p.dst.server, 0, &[0xb2; 4096]), NBD_EPERM);
    assert_eq!(p.src.ctl().ok("migrate-finish", json!({}))["phase"], "handed-over");
    let mut want = p.data.clone();
    want[..4096].fill(0xa3);
    assert!(read_all(&p.dst.server) == want);
}

#[test]
fn an_armed_source_disarms_once_the_destination_s_qemu_left_without_writing() {
    let p = pair_with(23, &["--abandoned-after", "2s"]);
    p.start(true);
    let mut ctl = p.src.ctl();
    // Probes come and go (nbdinfo, qemu-img info, a manager's checks): nothing changes.
    for _ in 0..3 {
        read(&p.dst.server, 0, 4096);
    }
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(ctl.ok("query-migrate", json!({}))["phase"], "ready", "a probe disarmed the source");
    // The destination's QEMU: attached longer than any probe, it reads and leaves without
    // writing (the manager abandoned its migration and ended it).
    {
        let mut qemu = RawClient::connect(&p.dst.server.socket, "", true).unwrap();
        assert_eq!(qemu.call(request(Cmd::Read, 1, 0, 4096), &[]).unwrap().error, 0);
        std::thread::sleep(Duration::from_secs(4));
    }
    let left = Instant::now();
    wait_phase(&mut ctl, "cancelled", HANG_LIMIT);
    assert!(left.elapsed() >= Duration::from_secs(2), "disarmed {:?} after the client left", left.elapsed());
    assert!(p.src.server.proc.log_text().contains("abandoned the migration"), "A says why");
    // A keeps its disk; B discarded the session and waits for a new one, which arms again.
    assert_eq!(write(&p.src.server, 0, &[0xa5; 4096]), 0);
    wait_for("B back to waiting", || status(&p.dst)["incoming-phase"] == "waiting");
    wait_for("A's overlay merged back", || status(&p.src)["mode"] == "direct");
    p.start(true);
    assert_eq!(write(&p.dst.server, 4096, &[0xb5; 4096]), 0, "B's first write takes the new arming's disk");
    wait_phase(&mut ctl, "completed", HANG_LIMIT);
    let mut want = p.data.clone();
    want[..4096].fill(0xa5);
    want[4096..8192].fill(0xb5);
    assert!(read_all(&p.dst.server) == want);
}

#[test]
fn a_destination_whose_source_is_gone_before_the_hand_over_never_serves_its_partial_copy() {
    let mut p = pair(24);
    p.start(true);
    // The source writes after the pre-copy: B's image does not have this yet.
    assert_eq!(write(&p.src.server, 0, &[0xa6; 4096]), 0);
    assert_eq!(read(&p.dst.server, 0, 4096), vec![0xa6; 4096], "B reads through to A");
    // The source proxy dies before B's guest wrote (the manager's migration may have resumed it
    // on B): B's reads fail instead of returning its own, partial copy.
    p.src.server.proc.child.kill().unwrap();
    let _ = p.src.server.proc.child.wait();
    wait_for("B's session over", || status(&p.dst)["incoming-phase"] == "waiting");
    let mut c = RawClient::connect(&p.dst.server.socket, "", true).unwrap();
    let r = c.call(request(Cmd::Read, 1, 0, 4096), &[]).unwrap();
    assert_ne!(r.error, 0, "B served {:?} from its partial copy", &r.data[..8.min(r.data.len())]);
    assert_eq!(write(&p.dst.server, 0, &[0xb6; 4096]), NBD_EPERM, "B's write takes nothing");
}

/// How long the destination waits for a claim to be answered.
fn e2e_claim_wait() -> Duration {
    nbd_row_proxy::migration::dest::CLAIM_WAIT
}
