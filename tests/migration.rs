//! Disk migration between two proxies: the destination ends byte-identical to the source's
//! disk at `migrate-finish` while a writer keeps writing during the pre-copy rounds, for both
//! strategies; a disk migrated there and back again is unchanged; `row` sends less update data
//! than `bitmap` on an overwrite-heavy workload.

use e2e::migration::*;
use e2e::*;
use nbd_proto::Command as Cmd;
use serde_json::json;

/// The tests here time rounds against a paced writer; running them one at a time keeps the
/// 2-core machine's scheduling from deciding what a round catches.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn destination_matches_the_source_for_both_strategies() {
    let _serial = serial();
    for (i, strategy) in ["row", "bitmap"].into_iter().enumerate() {
        let pair = Pair::start(11 + i as u64, "0123456789abcdef0123456789abcdef\n");
        let (src, dst, port) = (&pair.src, &pair.dst, pair.port);
        let data = pair.data;
        let (status, model) = migrate_under_load(src, port, strategy, data, 5 + i as u64);
        eprintln!("{strategy}: {}", serde_json::to_string(&status).unwrap());
        // The source's disk at the pause is the writer's model; the destination holds exactly that.
        assert!(read_all(&src.server) == model, "{strategy}: the source lost a write");
        assert!(std::fs::read(&dst.image).unwrap() == model, "{strategy}: the destination differs from the source");
        assert!(read_all(&dst.server) == model, "{strategy}: the destination's export differs");
        // The source now refuses writes; the destination takes them.
        let mut c = RawClient::connect(&src.server.socket, "", true).unwrap();
        assert_eq!(c.call(request(Cmd::Write, 1, 0, 4096), &[1; 4096]).unwrap().error, nbd_proto::consts::NBD_EPERM);
        src.ctl().ok("migrate-complete", json!({}));
        let mut d = RawClient::connect(&dst.server.socket, "", true).unwrap();
        assert_eq!(d.call(request(Cmd::Write, 1, 0, 4096), &[1; 4096]).unwrap().error, 0);
        let rounds = status["rounds"].as_array().unwrap();
        // row: base, cold updates (and settle passes if the final round would be too big),
        // final; bitmap: three pre-copy rounds and the final one.
        if strategy == "row" {
            assert!(rounds.len() >= 3, "{status}");
        } else {
            assert_eq!(rounds.len(), 4, "{status}");
        }
        assert_eq!(rounds.last().unwrap()["kind"], "final");
    }
}

#[test]
fn a_disk_migrated_there_and_back_is_unchanged() {
    let _serial = serial();
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let key = key_file(a_dir.path(), "there-and-back-again-key-0123456789");
    let (image_a, data) = source_image(a_dir.path(), 21);
    let src = source(a_dir.path(), &image_a, &key);
    let image_b = b_dir.path().join("disk.raw");
    sparse_file(&image_b, SIZE as u64);
    let port_b = free_port();
    let b = destination(b_dir.path(), &image_b, &key, port_b);
    let (_, model) = migrate_under_load(&src, port_b, "row", data, 3);
    src.ctl().ok("migrate-complete", json!({}));
    drop(src); // host A's source goes away; host A now receives the disk back
    let a_back_dir = a_dir.path().join("back");
    std::fs::create_dir(&a_back_dir).unwrap();
    let port_a = free_port();
    let a = destination(&a_back_dir, &image_a, &key, port_a);
    let (_, model) = migrate_under_load(&b, port_a, "row", model, 4);
    b.ctl().ok("migrate-complete", json!({}));
    assert!(std::fs::read(&image_a).unwrap() == model, "A's image after the round trip");
    assert!(read_all(&a.server) == model);
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &a.server.uri()])
        .arg(&image_a)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// `query-disk-digests` on both hosts of one disk over its whole range, the destination first
/// (leaving out what was written there since the commit), then the source for the same blocks.
fn digests_of_both(src: &Host, dst: &Host) -> (control_api::DiskDigestsReply, control_api::DiskDigestsReply) {
    use control_api::{DiskDigestsArgs, QueryDiskDigests};
    let args = DiskDigestsArgs { offset: 0, length: SIZE as u64, unit: 1 << 20, ..Default::default() };
    let theirs = dst
        .ctl()
        .call::<QueryDiskDigests>(DiskDigestsArgs { skip_written_since_commit: true, ..args.clone() })
        .expect("destination digests");
    let ours = src.ctl().call::<QueryDiskDigests>(DiskDigestsArgs { skip: theirs.skipped.clone(), ..args }).unwrap();
    (theirs, ours)
}

#[test]
fn after_the_switchover_both_copies_compare_while_the_guest_writes_and_a_changed_block_is_found() {
    let _serial = serial();
    let pair = Pair::start(31, "0123456789abcdef0123456789abcdef\n");
    let (src, dst, port) = (&pair.src, &pair.dst, pair.port);
    let data = pair.data;
    migrate_under_load(src, port, "row", data, 7);
    src.ctl().ok("migrate-complete", json!({}));

    // The guest writes on B: those blocks are left out on both sides, the rest is equal.
    let mut d = RawClient::connect(&dst.server.socket, "", true).unwrap();
    assert_eq!(d.call(request(Cmd::Write, 1, 10 * 4096, 8192), &[0xee; 8192]).unwrap().error, 0);
    let (theirs, ours) = digests_of_both(src, dst);
    assert_eq!(theirs.skipped, vec![[10, 2]], "{theirs:?}");
    assert_eq!(theirs.digests.len(), SIZE >> 20);
    assert_eq!(theirs.digests, ours.digests, "the copies differ");
    assert_eq!(ours.hashed_bytes, SIZE as u64 - 8192);

    // A block changed behind the proxy's back on B (not by the guest): its MiB alone differs.
    let f = std::fs::OpenOptions::new().write(true).open(&dst.image).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], 300 * 4096).unwrap();
    let (theirs, ours) = digests_of_both(src, dst);
    let differ: Vec<usize> = (0..ours.digests.len()).filter(|&i| ours.digests[i] != theirs.digests[i]).collect();
    assert_eq!(differ, vec![(300 * 4096) >> 20]);

    // A source has no commit to leave writes out from.
    let err = src
        .ctl()
        .execute(
            "query-disk-digests",
            json!({"offset": 0, "length": 4096, "unit": 4096, "skip-written-since-commit": true}),
        )
        .unwrap_err();
    assert!(err.contains("no record of the writes since a commit"), "{err}");
}

/// A deterministic overwrite-heavy workload, the same for both strategies: the writer rewrites
/// a hot set while round 1 is slowed down by a bandwidth cap.
fn update_bytes(strategy: &str) -> (u64, u64) {
    let pair = Pair::start(31, "0123456789abcdef0123456789abcdef");
    let (src, port) = (&pair.src, pair.port);
    let data = pair.data;
    let (status, model) = migrate_under_load(src, port, strategy, data, 77);
    assert!(std::fs::read(&pair.dst.image).unwrap() == model);
    (status["update-logical-bytes"].as_u64().unwrap(), status["update-wire-bytes"].as_u64().unwrap())
}

#[test]
fn row_sends_less_update_data_than_bitmap_on_an_overwrite_heavy_workload() {
    let _serial = serial();
    let (row_logical, row_wire) = update_bytes("row");
    let (bitmap_logical, bitmap_wire) = update_bytes("bitmap");
    eprintln!("update data after round 1: row {row_logical} B logical / {row_wire} B wire; bitmap {bitmap_logical} / {bitmap_wire}");
    assert!(row_wire < bitmap_wire, "row {row_wire} vs bitmap {bitmap_wire}");
    assert!(row_logical < bitmap_logical, "row {row_logical} vs bitmap {bitmap_logical}");
}

/// Polls `query-status` (a fresh client each time, as any operator's tool would) until
/// `progress` names a task starting with `task`; returns that progress.
fn progress_of(host: &Host, task: &str, timeout: std::time::Duration) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let st = host.ctl().ok("query-status", json!({}));
        let p = &st["progress"];
        if p["task"].as_str().is_some_and(|t| t.starts_with(task)) {
            return p.clone();
        }
        assert!(start.elapsed() < timeout, "no {task} progress in query-status within {timeout:?}: {st}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn query_status_shows_migration_and_merge_progress_to_any_client() {
    let _serial = serial();
    let pair = Pair::start(41, "progress-test-key-0123456789abcdef");
    let (src, port) = (&pair.src, pair.port);
    // Round 1 of 32 MiB at 4 MiB/s: several seconds to watch.
    let mut ctl = src.ctl();
    ctl.ok(
        "migrate-start",
        json!({ "uri": format!("tcp:127.0.0.1:{port}"), "strategy": "row", "max-bandwidth": 4 << 20 }),
    );
    let p = progress_of(src, "migration round 1", HANG_LIMIT);
    let p = if p["rate"].as_f64().unwrap_or(0.0) > 0.0 {
        p
    } else {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        progress_of(src, "migration round 1", HANG_LIMIT)
    };
    eprintln!("migration progress: {p}");
    let (done, total) = (p["done-bytes"].as_u64().unwrap(), p["total-bytes"].as_u64().unwrap());
    assert!(total > 0 && done <= total, "{p}");
    assert!(p["rate"].as_f64().unwrap() > 0.0, "{p}");
    // The ETA is what is left at the rate shown (what the rate is depends on the machine).
    let left = (total - done) as f64 / p["rate"].as_f64().unwrap();
    assert!(p["eta-seconds"].as_f64().is_some_and(|eta| eta > 0.0 && (eta - left).abs() <= left * 1e-6), "{p}");
    // Cancelling merges the overlay back; fill it first so the merge takes a moment.
    ctl.ok("migrate-cancel", json!({}));
    wait_phase(&mut ctl, "cancelled", HANG_LIMIT);
    // The cancel merges the (small) overlay back; once that is done no task is shown.
    let started = std::time::Instant::now();
    while !src.ctl().ok("query-status", json!({}))["progress"].is_null() {
        assert!(started.elapsed() < HANG_LIMIT, "a task is still shown after the cancel");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ctl.ok("row-start", json!({}));
    let mut c = RawClient::connect(&src.server.socket, "", true).unwrap();
    let block = vec![0x5au8; BS];
    for i in 0..(SIZE / BS) as u64 {
        // Every other block, so the overlay is scattered.
        if i % 2 == 0 {
            assert_eq!(c.call(request(Cmd::Write, i, i * BS as u64, BS as u32), &block).unwrap().error, 0);
        }
    }
    ctl.ok("row-stop", json!({ "wait": false }));
    let p = progress_of(src, "merge-back", HANG_LIMIT);
    eprintln!("merge progress: {p}");
    assert_eq!(p["total-bytes"].as_u64(), Some((SIZE / 2) as u64), "{p}");
    assert!(p["done-bytes"].as_u64().unwrap() <= (SIZE / 2) as u64, "{p}");
}

/// `migrate-cancel` during a final round that would take long (every block rewritten after the
/// pre-copy, sent at 2 MiB/s with post-copy off): the round stops before its commit instead of
/// holding the source for the whole round (the cancel used to wait behind it and time out),
/// `migrate-finish` fails saying so, the source writes again and the destination holds nothing.
#[test]
fn a_cancel_stops_a_final_round_before_its_commit() {
    let _serial = serial();
    let pair = Pair::start(43, "cancel-final-key-0123456789abcdef");
    let (src, dst, port) = (&pair.src, &pair.dst, pair.port);
    let mut ctl = src.ctl();
    let uri = format!("tcp:127.0.0.1:{port}");
    ctl.ok("migrate-start", json!({ "uri": uri, "strategy": "row", "max-bandwidth": 2 << 20, "rounds": 1 }));
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    // Every block rewritten: the final round carries the whole 32 MiB, about 16 s at 2 MiB/s.
    let mut c = RawClient::connect(&src.server.socket, "", true).unwrap();
    for i in 0..(SIZE / BS) as u64 {
        let block = random_bytes(i + 1000, BS);
        assert_eq!(c.call(request(Cmd::Write, i, i * BS as u64, BS as u32), &block).unwrap().error, 0);
    }
    let control = src.control.clone();
    let finish = std::thread::spawn(move || {
        let mut ctl = ControlClient::connect(&control);
        ctl.execute("migrate-finish", json!({ "postcopy": "never" }))
    });
    // Once the final round is under way (and has sent something), cancel it.
    let started = std::time::Instant::now();
    loop {
        let m = ctl.ok("query-migrate", json!({}));
        let sending = m["rounds"].as_array().and_then(|r| r.last()).is_some_and(|r| r["kind"] == "final");
        if m["phase"] == "finishing" && (sending || m["round-blocks"].as_u64().unwrap_or(0) > 0) {
            break;
        }
        assert!(started.elapsed() < HANG_LIMIT, "no final round: {m}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    ctl.ok("migrate-cancel", json!({}));
    let finished = finish.join().unwrap();
    let err = finished.expect_err("the final round was cancelled");
    assert!(err.contains("migrate-cancel during the final round"), "{err}");
    let status = ctl.ok("query-migrate", json!({}));
    assert!(status["round-remaining-blocks"].as_u64().unwrap_or(0) > 0, "stopped before its end: {status}");
    // The source owns its disk again: writes go through; the destination committed nothing.
    let started = std::time::Instant::now();
    while !ctl.ok("query-status", json!({}))["writes-refused"].is_null() {
        assert!(started.elapsed() < HANG_LIMIT, "the source still refuses writes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(c.call(request(Cmd::Write, 1, 0, BS as u32), &vec![1u8; BS]).unwrap().error, 0);
    let d = dst.ctl().ok("query-status", json!({}));
    assert!(d["incoming-phase"] != "committed" && d["incoming-phase"] != "owner", "{d}");
}
