//! ROW under a live guest: a QEMU TCG guest keeps writing a skewed workload (`row-workload`)
//! to its disk on nbd-row-proxy while the test switches ROW on and merges it back, twice. The
//! guest then reads every block it wrote back, and the host checks the image holds exactly the
//! latest version of every block, re-derived from the workload's seed.

use std::time::{Duration, Instant};

use e2e::*;
use serde_json::json;
use workload::{inspect, Content, Header, Profile, Workload, BLOCK_SIZE};

const IMAGE_SIZE: u64 = 64 << 20;
/// The workload area: 32 MiB starting at 1 MiB, so the host can check nothing else changes.
const FIRST_BLOCK: u64 = 256;
const AREA_BLOCKS: u64 = 8192;
const HOT_BLOCKS: u64 = 256;
const HOT_SHARE: f64 = 0.9;
const SEED: u64 = 0x00c0_ffee;
const WRITES: u64 = 5000;
/// Writes per second: 5000 writes take 25 s, long enough for two ROW rounds.
const RATE: u64 = 200;

fn profile() -> Profile {
    Profile::skewed(AREA_BLOCKS, HOT_BLOCKS, HOT_SHARE)
}

/// Polls `query-row` for at least `duration`, and on until `blocks-updated` has grown (a guest
/// under TCG on a busy machine may stall for a while; [`HANG_LIMIT`] catches one that hangs);
/// returns the `blocks-updated` samples.
fn watch_blocks_updated(c: &mut ControlClient, duration: Duration) -> Vec<u64> {
    let start = Instant::now();
    let mut samples = Vec::new();
    loop {
        let row = c.ok("query-row", json!({}));
        assert_eq!(row["mode"], "row", "{row}");
        samples.push(row["blocks-updated"].as_u64().unwrap());
        let grown = samples.len() >= 3 && samples.last() > samples.first();
        if (grown && start.elapsed() >= duration) || start.elapsed() > HANG_LIMIT {
            return samples;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The value of `key=` on the console line starting with `prefix`.
fn console_field<'a>(console: &'a str, prefix: &str, key: &str) -> Option<&'a str> {
    let line = console.lines().find(|l| l.starts_with(prefix))?;
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn row_rounds_under_a_writing_guest_keep_every_latest_version() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, IMAGE_SIZE);
    let control = dir.path().join("control.sock");
    let mut server = Server::start(dir.path(), &image, &["--control", control.to_str().unwrap()]);
    server.proc.wait_for_socket(&control);
    let mut c = ControlClient::connect(&control);
    assert_eq!(c.ok("query-status", json!({}))["mode"], "direct");

    let args = [
        "--device".to_string(),
        "/dev/vda".into(),
        "--first-block".into(),
        FIRST_BLOCK.to_string(),
        "--area-blocks".into(),
        AREA_BLOCKS.to_string(),
        "--hot-blocks".into(),
        HOT_BLOCKS.to_string(),
        "--hot-share".into(),
        HOT_SHARE.to_string(),
        "--rate".into(),
        RATE.to_string(),
        "--writes".into(),
        WRITES.to_string(),
        "--seed".into(),
        SEED.to_string(),
        "--verify".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let console = dir.path().join("console.log");
    let mut guest = start_guest_with_args(&server.uri(), "row-workload", &args, &console);
    // The first progress line: the guest has booted and writes at its rate.
    wait_for_log(&mut guest, "WORKLOAD written=", HANG_LIMIT);
    let booted = t0.elapsed();

    let reserved = state_entry_of(&image).join("overlay");
    let mut merged = Vec::new();
    for round in 1..=2 {
        c.ok("row-start", json!({}));
        assert_eq!(c.ok("query-status", json!({}))["mode"], "row", "round {round}");
        assert!(reserved.exists(), "round {round}: no reserved file while ROW is on");
        let samples = watch_blocks_updated(&mut c, Duration::from_secs(3));
        assert!(samples.windows(2).all(|w| w[0] <= w[1]), "round {round}: blocks-updated shrank: {samples:?}");
        assert!(
            samples.len() >= 3 && samples.last() > samples.first(),
            "round {round}: blocks-updated did not grow while the guest writes: {samples:?}"
        );
        let row = c.ok("query-row", json!({}));
        assert!(row["hot-blocks"].as_u64().unwrap() > 0, "round {round}: no hot blocks under a skewed workload: {row}");
        let stop_started = Instant::now();
        let done = c.ok("row-stop", json!({"wait": true}));
        let stop_secs = stop_started.elapsed().as_secs_f64();
        let status = c.ok("query-status", json!({}));
        assert_eq!(status["mode"], "direct", "round {round}: {status}");
        assert!(!reserved.exists(), "round {round}: reserved file left after row-stop");
        merged.push((done["merged-blocks"].as_u64().unwrap(), stop_secs, samples));
        // The guest must still be writing: the rounds are meant to race with its writes.
        let text = guest.log_text();
        assert!(
            !text.contains("WORKLOAD-WRITES-DONE"),
            "round {round}: the guest finished writing before row-stop returned; slow down the rounds or add writes\n{text}"
        );
    }
    let rounds_done = t0.elapsed();

    let status = guest.wait_or_kill(HANG_LIMIT);
    let text = guest.log_text();
    assert!(status.success(), "qemu exited with {status}; console:\n{text}");
    assert!(text.contains("WORKLOAD-VERIFY-OK"), "guest verification failed; console:\n{text}");
    assert!(text.contains("GUEST-CMD-EXIT 0"), "console:\n{text}");
    let guest_done = t0.elapsed();

    // The host re-derives the guest's ledger from the seed: same writes, same digest.
    let ledger = Workload::ledger_after(profile(), SEED, WRITES);
    let want_digest = format!("{:016x}", ledger.digest());
    assert_eq!(console_field(&text, "WORKLOAD-VERIFY-OK", "writes"), Some(WRITES.to_string().as_str()), "{text}");
    assert_eq!(console_field(&text, "WORKLOAD-VERIFY-OK", "digest"), Some(want_digest.as_str()), "{text}");

    // The disk ends in direct mode with the overlay gone.
    let status = c.ok("query-status", json!({}));
    assert_eq!(status["mode"], "direct", "{status}");
    assert!(status["reserved"].is_null(), "{status}");
    assert!(!reserved.exists(), "reserved file must be deleted");
    assert!(!state_entry_of(&image).join("overlay.map").exists(), "journal must be deleted");
    assert_eq!(c.ok("query-row", json!({}))["blocks-updated"], 0);

    // Every block the guest wrote holds exactly its latest version; nothing else was touched.
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len() as u64, IMAGE_SIZE);
    let area = FIRST_BLOCK as usize * BLOCK_SIZE..(FIRST_BLOCK + AREA_BLOCKS) as usize * BLOCK_SIZE;
    assert!(bytes[..area.start].iter().all(|&b| b == 0), "bytes before the area changed");
    assert!(bytes[area.end..].iter().all(|&b| b == 0), "bytes after the area changed");
    let mut bad = Vec::new();
    for b in 0..AREA_BLOCKS {
        let block = FIRST_BLOCK + b;
        let off = block as usize * BLOCK_SIZE;
        let got = inspect(&bytes[off..off + BLOCK_SIZE], SEED);
        let want = match ledger.latest(b) {
            0 => Content::Zero,
            version => Content::Valid(Header { block, version }),
        };
        if got != want {
            bad.push(format!("block {block}: want {want}, got {got}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} blocks wrong on the host, first: {:#?}",
        bad.len(),
        AREA_BLOCKS,
        &bad[..bad.len().min(20)]
    );

    let log = server.proc.log_text();
    eprintln!(
        "qemu_row: booted+first progress {:.1}s, rounds done {:.1}s, guest done {:.1}s; {} blocks, {} writes; \
         rounds (merged blocks, row-stop seconds, blocks-updated samples): {merged:?}",
        booted.as_secs_f64(),
        rounds_done.as_secs_f64(),
        guest_done.as_secs_f64(),
        ledger.blocks_written(),
        ledger.writes()
    );
    for line in text.lines().filter(|l| l.starts_with("WORKLOAD")) {
        eprintln!("  guest: {line}");
    }
    assert!(log.contains("merge complete"), "server log:\n{log}");
}
