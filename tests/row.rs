//! ROW mode through real processes: the control socket, the frozen base export, merge back,
//! and SIGKILL at random points (including during the merge) with every flushed write checked.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use e2e::*;
use nbd_proto::Command as Cmd;
use serde_json::json;

fn start(dir: &std::path::Path, image: &std::path::Path) -> (Server, std::path::PathBuf) {
    let control = dir.join("control.sock");
    let mut server = Server::start(dir, image, &["--export", "vm1", "--control", control.to_str().unwrap()]);
    server.proc.wait_for_socket(&control);
    (server, control)
}

#[test]
fn control_socket_reports_and_refuses_bad_commands() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 8 << 20);
    let (_server, control) = start(dir.path(), &image);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let mut c = ControlClient::connect(&control);
    let status = c.ok("query-status", json!({}));
    assert_eq!(status["mode"], "direct");
    assert_eq!(status["image-size"], 8 << 20);
    assert_eq!(status["export"], "vm1");
    let err = c.execute("no-such-command", json!({})).unwrap_err();
    assert!(err.contains("CommandNotFound") || err.contains("has not been found"), "{err}");
    let err = c.execute("row-stop", json!({"bogus": 1})).unwrap_err();
    assert!(err.contains("bogus"), "{err}");
    let err = c.execute("row-stop", json!({})).unwrap_err();
    assert!(err.contains("not on"), "row-stop in direct mode: {err}");
    // The connection survived every error.
    assert_eq!(c.ok("query-row", json!({}))["blocks-updated"], 0);
}

#[test]
fn row_freezes_the_base_serves_it_and_merges_back() {
    require_tool("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let original = random_bytes(7, 32 << 20);
    std::fs::write(&image, &original).unwrap();
    let (server, control) = start(dir.path(), &image);
    let mut c = ControlClient::connect(&control);
    c.ok("row-start", json!({}));
    let ev = c.next_event(HANG_LIMIT).expect("ROW_STARTED event");
    assert_eq!(ev.event, "ROW_STARTED");
    assert_eq!(c.ok("query-status", json!({}))["mode"], "row");
    assert!(state_entry_of(&image).join("overlay").exists());

    let mut expected = original.clone();
    let mut apply = |off: usize, data: &[u8]| expected[off..off + data.len()].copy_from_slice(data);
    run_ok(Command::new("qemu-io").args(["-f", "raw", &server.uri_of("vm1")]).args([
        "-c",
        "write -P 0x61 512 512",
        "-c",
        "write -P 0x62 8k 4k",
        "-c",
        "write -P 0x63 1M 1M",
        "-c",
        "write -z 4M 64k",
        "-c",
        "discard 8M 128k",
        "-c",
        "write -P 0x64 12M 3k",
        "-c",
        "flush",
    ]));
    apply(512, &[0x61; 512]);
    apply(8192, &[0x62; 4096]);
    apply(1 << 20, &vec![0x63; 1 << 20]);
    apply(4 << 20, &vec![0; 65536]);
    apply(8 << 20, &vec![0; 131072]);
    apply(12 << 20, &vec![0x64; 3072]);

    // The image itself is frozen; the base export shows it, the live export shows the writes.
    assert!(std::fs::read(&image).unwrap() == original, "image changed while frozen");
    let base_copy = dir.path().join("base.bin");
    run_ok(Command::new("nbdcopy").arg(server.uri_of("vm1@base")).arg(&base_copy));
    assert!(std::fs::read(&base_copy).unwrap() == original, "vm1@base differs from the frozen image");
    let live_copy = dir.path().join("live.bin");
    run_ok(Command::new("nbdcopy").arg(server.uri_of("vm1")).arg(&live_copy));
    assert!(std::fs::read(&live_copy).unwrap() == expected, "live export differs from the writes");
    let list = run_ok(Command::new("nbdinfo").args(["--list", "--json", &server.uri()]));
    assert!(String::from_utf8_lossy(&list.stdout).contains("vm1@base"));
    let row = c.ok("query-row", json!({}));
    // 1 + 1 + 256 + 16 + 32 + 1 blocks of 4 KiB.
    assert_eq!(row["blocks-updated"], 307, "{row}");
    // The mapping holds runs, not blocks: one per written range here.
    assert!(row["map-runs"].as_u64().unwrap() <= 6, "{row}");

    let done = c.ok("row-stop", json!({"wait": true}));
    assert_eq!(done["merged-blocks"], 307);
    assert_eq!(c.ok("query-status", json!({}))["mode"], "direct");
    assert!(!state_entry_of(&image).join("overlay").exists(), "reserved file must be deleted");
    assert!(!state_entry_of(&image).join("overlay.map").exists(), "journal must be deleted");
    assert!(std::fs::read(&image).unwrap() == expected, "image after merge differs");
    // The base export is gone with ROW.
    let out = Command::new("nbdinfo").arg(server.uri_of("vm1@base")).output().unwrap();
    assert!(!out.status.success());
}

/// Every version a block may show after a crash: its flushed content, then anything written
/// (or in flight) since.
struct CrashModel {
    current: Vec<u8>,
    since_flush: HashMap<usize, Vec<Vec<u8>>>,
}

const BS: usize = 4096;

impl CrashModel {
    fn possible(&mut self, off: usize, data: &[u8]) {
        let mut next = self.current.clone();
        next[off..off + data.len()].copy_from_slice(data);
        for b in off / BS..=(off + data.len() - 1) / BS {
            let old = self.current[b * BS..(b + 1) * BS].to_vec();
            let entry = self.since_flush.entry(b).or_insert_with(|| vec![old]);
            entry.push(next[b * BS..(b + 1) * BS].to_vec());
        }
    }

    fn acked(&mut self, off: usize, data: &[u8]) {
        self.current[off..off + data.len()].copy_from_slice(data);
    }

    fn flushed(&mut self) {
        self.since_flush.clear();
    }

    fn check_and_adopt(&mut self, disk: &[u8], round: usize) {
        for b in 0..disk.len() / BS {
            let got = &disk[b * BS..(b + 1) * BS];
            let ok = match self.since_flush.get(&b) {
                Some(versions) => versions.iter().any(|v| v == got),
                None => got == &self.current[b * BS..(b + 1) * BS],
            };
            assert!(ok, "round {round}: block {b} after SIGKILL is not a version written since the last flush");
        }
        self.current = disk.to_vec();
        self.since_flush.clear();
    }
}

#[test]
fn sigkill_at_random_points_loses_no_flushed_write() {
    const SIZE: usize = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let base = random_bytes(99, SIZE);
    std::fs::write(&image, &base).unwrap();
    let mut model = CrashModel { current: base, since_flush: HashMap::new() };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut kills_during_merge = 0;

    for round in 0..24 {
        let (mut server, control) = start(dir.path(), &image);
        let disk = read_disk(&server, SIZE);
        model.check_and_adopt(&disk, round);
        let mut ctl = ControlClient::connect(&control);
        let status = ctl.ok("query-status", json!({}));
        let mode = status["mode"].as_str().unwrap().to_string();
        if mode == "direct" && round % 6 != 5 {
            ctl.ok("row-start", json!({}));
        }
        let pid = server.proc.pid();
        // Every sixth round leaves ROW: the overlay built by the earlier rounds is merged back
        // and the kill lands a few milliseconds into the merge.
        let merge_round = round % 6 == 5 && mode == "row";
        if merge_round {
            // Scatter a few thousand blocks over the overlay so the merge has work to be killed in.
            let mut c = RawClient::connect(&server.socket, "", true).unwrap();
            let writes: Vec<(usize, Vec<u8>)> =
                (0..SIZE / BS).step_by(2).map(|b| (b * BS, random_bytes(next(u64::MAX), BS))).collect();
            // Pipelined 64 at a time: a client must read replies while it sends.
            for (batch_no, batch) in writes.chunks(64).enumerate() {
                for (i, (off, data)) in batch.iter().enumerate() {
                    model.possible(*off, data);
                    c.send(request(Cmd::Write, (batch_no * 64 + i) as u64, *off as u64, BS as u32), data).unwrap();
                }
                for _ in batch {
                    assert_eq!(c.recv().unwrap().error, 0);
                }
                for (off, data) in batch {
                    model.acked(*off, data);
                }
            }
            assert_eq!(c.call(request(Cmd::Flush, 0, 0, 0), &[]).unwrap().error, 0);
            model.flushed();
            ctl.ok("row-stop", json!({"wait": false}));
            kills_during_merge += 1;
        }
        let delay = if merge_round { next(4) } else { 30 + next(200) };
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            signal(pid, libc::SIGKILL);
        });
        if let Ok(mut c) = RawClient::connect(&server.socket, "", true) {
            for i in 0u64.. {
                if i % 8 == 7 {
                    match c.call(request(Cmd::Flush, i, 0, 0), &[]) {
                        Ok(r) if r.error == 0 => model.flushed(),
                        _ => break,
                    }
                    continue;
                }
                let sector = next((SIZE / 512) as u64) as usize;
                let len = (1 + next(128) as usize).min(SIZE / 512 - sector) * 512;
                let data = random_bytes(next(u64::MAX), len);
                model.possible(sector * 512, &data);
                match c.call(request(Cmd::Write, i, (sector * 512) as u64, len as u32), &data) {
                    Ok(r) if r.error == 0 => model.acked(sector * 512, &data),
                    Ok(r) => panic!("write refused with {}", r.error),
                    Err(_) => break,
                }
            }
        }
        killer.join().unwrap();
        let status = server.proc.wait_or_kill(Duration::from_secs(10));
        assert!(!status.success(), "round {round}: the server should have been killed");
    }
    assert!(kills_during_merge >= 3);
    // The server resumes an interrupted merge on start: the log says how often it had to.
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    let resumed = log.matches("resuming the merge").count();
    eprintln!("{kills_during_merge} kills aimed at merges, {resumed} restarts resumed one");
    assert!(resumed >= 1, "no kill landed inside a merge");
    // Finally: merge back whatever is left and check the image file itself.
    let (server, control) = start(dir.path(), &image);
    let disk = read_disk(&server, SIZE);
    model.check_and_adopt(&disk, 99);
    let mut ctl = ControlClient::connect(&control);
    if ctl.ok("query-status", json!({}))["mode"] != "direct" {
        ctl.ok("row-stop", json!({"wait": true}));
    }
    drop(server);
    assert!(std::fs::read(&image).unwrap() == model.current, "image after the final merge");
}
