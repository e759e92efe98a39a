//! Post-copy between two proxies: `migrate-finish` with `postcopy` leaves the final round's data
//! at the source; the destination serves the disk at once, a read of a block it does not hold
//! yet fetches it, a guest write is never overwritten by the push, and the session completes
//! when every block is there. If the source dies during the post-copy, reads of missing blocks
//! fail (EIO, what QEMU's rerror=stop turns into a pause) and nothing is lost: the restarted
//! source resumes the push from its durable record and the destination's residual log.

use std::time::{Duration, Instant};

use control_api::{MigrateFinishArgs, MigrationStatus, NoArgs, PostcopyMode, QueryMigrate, QueryStatus};
use e2e::migration::*;
use e2e::*;
use nbd_proto::Command as Cmd;

/// Blocks the source writes just before the switchover: they are in the final round, so
/// post-copy leaves them at the source.
const LATE_FIRST: usize = 5000;
const LATE_BLOCKS: usize = 100;

/// The push waits this long after the switchover, so the destination's reads meet missing blocks.
const PUSH_PAUSE: &str = "postcopy-push:3000";

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Both proxies, a migration with a writer during the rounds, and the late writes; returns the
/// hosts, the disk the source holds at the switchover and the destination's directory.
fn switch_over_with_postcopy(
    src_dir: &std::path::Path,
    dst_dir: &std::path::Path,
    dst_extra: &[&str],
) -> (Host, Host, Vec<u8>, u16, std::path::PathBuf) {
    let key = key_file(src_dir, "0123456789abcdef0123456789abcdef\n");
    let (image, data) = source_image(src_dir, 31);
    let src = source(src_dir, &image, &key);
    let dst_image = dst_dir.join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let mut protection = vec!["--auth-key-file", key.to_str().unwrap()];
    protection.extend_from_slice(dst_extra);
    let dst = destination_with(dst_dir, &dst_image, &protection, port);
    let writer = Writer::start_with(&src.server.socket, data, 5, 1500, 0);
    let mut ctl = src.ctl();
    let args = control_api::MigrateStartArgs::new(format!("tcp:127.0.0.1:{port}"), control_api::Strategy::Row);
    ctl.call::<control_api::MigrateStart>(args).expect("migrate-start");
    wait_phase(&mut ctl, "ready", HANG_LIMIT);
    let (mut model, _) = writer.stop();
    // Late writes, as a guest writes until it pauses.
    let mut c = RawClient::connect(&src.server.socket, "", true).unwrap();
    for b in LATE_FIRST..LATE_FIRST + LATE_BLOCKS {
        let block = random_bytes(b as u64 * 7 + 1, BS);
        assert_eq!(c.call(request(Cmd::Write, b as u64, (b * BS) as u64, BS as u32), &block).unwrap().error, 0);
        model[b * BS..(b + 1) * BS].copy_from_slice(&block);
    }
    drop(c);
    let args = MigrateFinishArgs { postcopy: Some(PostcopyMode::Always), budget_ms: None };
    let finished = ctl.call::<control_api::MigrateFinish>(args).expect("migrate-finish");
    assert_eq!(finished.phase, control_api::Phase::HandedOver, "{finished:?}");
    let p = finished.postcopy.as_ref().expect("a post-copy switchover");
    assert!(p.blocks >= LATE_BLOCKS as u64, "the late writes are left for the post-copy: {p:?}");
    (src, dst, model, port, dst_image)
}

fn wait_postcopy_done(src: &Host, timeout: Duration) -> MigrationStatus {
    let mut ctl = src.ctl();
    let started = Instant::now();
    loop {
        let s = ctl.call::<QueryMigrate>(NoArgs {}).expect("query-migrate");
        if s.postcopy.as_ref().is_some_and(|p| p.done) {
            return s;
        }
        assert!(
            started.elapsed() < timeout,
            "the post-copy did not finish within {timeout:?}: {s:?}\n{}",
            src.server.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_destination_serves_at_once_and_every_block_arrives() {
    let _serial = serial();
    std::env::set_var(control_api::PAUSE_VAR, PUSH_PAUSE);
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, dst, mut model, _, dst_image) = switch_over_with_postcopy(src_dir.path(), dst_dir.path(), &[]);
    let residual_log = state_entry_of(&dst_image).join("residual");
    assert!(residual_log.exists(), "the destination records what it does not hold yet");
    let mut dctl = dst.ctl();
    let status = dctl.call::<QueryStatus>(NoArgs {}).unwrap();
    let missing = status.postcopy.as_ref().expect("post-copy on the destination").missing_blocks;
    assert!(missing >= LATE_BLOCKS as u64, "{status:?}");

    // The guest runs on the destination now: a whole-block write to a missing block needs no
    // fetch and must survive the push; a partial one fetches the block first.
    let mut c = RawClient::connect(&dst.server.socket, "", true).unwrap();
    let whole = random_bytes(77, BS);
    let at = LATE_FIRST * BS;
    assert_eq!(c.call(request(Cmd::Write, 1, at as u64, BS as u32), &whole).unwrap().error, 0);
    model[at..at + BS].copy_from_slice(&whole);
    let part = random_bytes(78, 512);
    let at = (LATE_FIRST + 1) * BS + 1024;
    assert_eq!(c.call(request(Cmd::Write, 2, at as u64, 512), &part).unwrap().error, 0);
    model[at..at + 512].copy_from_slice(&part);
    // Reads of blocks not pushed yet are fetched (the push waits 3 s): the whole disk is right.
    let started = Instant::now();
    let got = read_all(&dst.server);
    assert!(got == model, "the destination reads the source's data and its own writes");
    let reads = started.elapsed();
    let status = dctl.call::<QueryStatus>(NoArgs {}).unwrap();
    let pc = status.postcopy.expect("post-copy figures");
    assert!(pc.waits > 0, "reads waited for fetches while the push paused: {pc:?}");
    // Reading every block fetched every block: nothing is missing any more.
    assert_eq!(pc.missing_blocks, 0, "{pc:?}");
    eprintln!("read the whole disk during post-copy in {reads:?}: {pc:?}");

    // migrate-complete waits for the push; then every block is here and the log is gone.
    let mut sctl = src.ctl();
    let early = sctl.execute("migrate-complete", serde_json::json!({}));
    if let Err(e) = &early {
        assert!(e.contains("post-copy is still running"), "{e}");
    }
    let done = wait_postcopy_done(&src, HANG_LIMIT);
    assert!(done.postcopy.as_ref().unwrap().fetches > 0, "{done:?}");
    sctl.ok("migrate-complete", serde_json::json!({}));
    // It stays, marked complete: a log gone missing is never taken for a post-copy that ended.
    assert!(residual_log.exists(), "the residual log is kept, marked complete");
    let status = dctl.call::<QueryStatus>(NoArgs {}).unwrap();
    assert_eq!(status.postcopy.unwrap().missing_blocks, 0);
    drop(c);
    assert!(read_all(&dst.server) == model, "the push did not overwrite the destination's writes");
    let on_disk = std::fs::read(&dst_image).unwrap();
    assert!(on_disk == model, "the image itself holds the disk");
    std::env::remove_var(control_api::PAUSE_VAR);
}

#[test]
fn a_source_killed_during_post_copy_fails_reads_then_resumes_after_a_restart() {
    let _serial = serial();
    std::env::set_var(control_api::PAUSE_VAR, PUSH_PAUSE);
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut src, dst, mut model, _, _) =
        switch_over_with_postcopy(src_dir.path(), dst_dir.path(), &["--read-wait", "1s"]);
    // The source dies before pushing anything.
    src.server.proc.wait_or_kill(Duration::ZERO);
    let mut c = RawClient::connect(&dst.server.socket, "", true).unwrap();
    let at = (LATE_FIRST + 10) * BS;
    let started = Instant::now();
    let r = c.call(request(Cmd::Read, 1, at as u64, BS as u32), &[]).unwrap();
    assert_eq!(r.error, nbd_proto::consts::NBD_EIO, "a missing block cannot be read while the source is gone");
    // --read-wait is 1 s; under the 10 s default, with room for a busy machine.
    assert!(started.elapsed() < Duration::from_secs(9), "the read fails after --read-wait, not never");
    // A block the destination holds is still served: one the guest writes whole there (held
    // at once, missing or not: which blocks the writer left to the post-copy is random).
    let block = random_bytes(77, BS);
    assert_eq!(c.call(request(Cmd::Write, 2, 0, BS as u32), &block).unwrap().error, 0, "a whole-block write");
    model[..BS].copy_from_slice(&block);
    let r = c.call(request(Cmd::Read, 4, 0, BS as u32), &[]).unwrap();
    assert!(r.error == 0 && r.data == model[..BS], "blocks the destination holds are served");

    // The restarted source finds its hand-over with a post-copy, keeps refusing writes and
    // resumes the push; the destination says what it still misses.
    let key = src_dir.path().join("key");
    let src = source(src_dir.path(), &src_dir.path().join("disk.raw"), &key);
    let mut sctl = src.ctl();
    let status = sctl.call::<QueryStatus>(NoArgs {}).unwrap();
    assert!(status.fence.is_some(), "the restarted source keeps its disk fenced: {status:?}");
    let done = wait_postcopy_done(&src, HANG_LIMIT);
    assert!(done.postcopy.is_some());
    let r = c.call(request(Cmd::Read, 3, at as u64, BS as u32), &[]).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data == model[at..at + BS], "the block read after the restart is the source's");
    sctl.ok("migrate-complete", serde_json::json!({}));
    drop(c);
    assert!(read_all(&dst.server) == model, "every block arrived after the restart");
    std::env::remove_var(control_api::PAUSE_VAR);
}

/// The destination's residual log damaged while blocks are still missing (deleted, cut to its
/// header, one byte flipped in the missing ranges): a restarted destination cannot prove which
/// blocks it holds, so it refuses every read and write (EIO, with the reason in query-status)
/// instead of serving the image's stale blocks; with the log put back, the post-copy goes on and
/// nothing is lost.
#[test]
fn a_damaged_residual_log_is_refused_not_trusted() {
    let _serial = serial();
    std::env::set_var(control_api::PAUSE_VAR, PUSH_PAUSE);
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let protection = ["--read-wait", "1s"];
    let (src, mut dst, model, port, dst_image) = switch_over_with_postcopy(src_dir.path(), dst_dir.path(), &protection);
    let log = state_entry_of(&dst_image).join("residual");
    let saved = std::fs::read(&log).unwrap();
    let key = src_dir.path().join("key");
    let mut args = vec!["--auth-key-file", key.to_str().unwrap()];
    args.extend_from_slice(&protection);
    let header = migration_session::residual::HEADER_LEN;
    let damages: [(&str, Option<Vec<u8>>); 3] = [
        ("deleted", None),
        ("cut to its header", Some(saved[..header].to_vec())),
        (
            "a byte flipped in the missing ranges",
            Some({
                let mut b = saved.clone();
                b[header + 5] ^= 0x20;
                b
            }),
        ),
    ];
    for (what, damaged) in damages {
        dst.server.proc.wait_or_kill(Duration::ZERO);
        match &damaged {
            Some(bytes) => std::fs::write(&log, bytes).unwrap(),
            None => std::fs::remove_file(&log).unwrap(),
        }
        dst = destination_with(dst_dir.path(), &dst_image, &args, port);
        let mut c = RawClient::connect(&dst.server.socket, "", true).unwrap();
        let at = (LATE_FIRST * BS) as u64;
        let r = c.call(request(Cmd::Read, 1, at, BS as u32), &[]).unwrap();
        assert_ne!(r.error, 0, "{what}: a block that may be missing is never served stale");
        let r = c.call(request(Cmd::Read, 2, 0, BS as u32), &[]).unwrap();
        assert_ne!(r.error, 0, "{what}: no block is served at all");
        let w = c.call(request(Cmd::Write, 3, 0, BS as u32), &random_bytes(5, BS)).unwrap();
        assert_ne!(w.error, 0, "{what}: nor written");
        let status = dst.ctl().call::<QueryStatus>(NoArgs {}).unwrap();
        let why = status.writes_refused.unwrap_or_default();
        assert!(why.contains("residual"), "{what}: query-status says why: {why:?}");
    }
    // Put back, the log governs again: the push resumes and every block arrives.
    dst.server.proc.wait_or_kill(Duration::ZERO);
    std::fs::write(&log, &saved).unwrap();
    std::env::remove_var(control_api::PAUSE_VAR);
    let dst = destination_with(dst_dir.path(), &dst_image, &args, port);
    let done = wait_postcopy_done(&src, HANG_LIMIT);
    assert!(done.postcopy.is_some());
    assert!(read_all(&dst.server) == model, "every block arrived once the log was back");
}
