//! Scale: a 1 TiB sparse disk with 64 MiB of data, migrated by row between two proxies, while
//! a client writes 200,000 scattered 4 KiB blocks and then, during the migration, zeroes 64 GiB
//! (what `fstrim` or `blkdiscard -z` in a guest does).
//!
//! What must hold: the source's mapping costs at most 20 bytes per updated block (12 for the
//! run, 4 for its slot in the reserved file, the rest the tree); zeroing 64 GiB
//! grows the source by less than 5 MiB of RSS and adds a handful of runs; the round that carries
//! the zeroed range sends it as zero extents (kilobytes on the wire, not gigabytes); round 1 sends
//! only what is allocated; and the destination holds exactly what was written. The figures are
//! printed (`cargo test -p e2e --test scale -- --nocapture`; `scripts/bench-scale` runs it in
//! release mode for the README).

use std::time::Instant;

use e2e::migration::*;
use e2e::*;
use nbd_proto::Command as Cmd;
use nbd_proto::Request;
use serde_json::{json, Value};

const TIB: u64 = 1 << 40;
const DATA_PIECES: u64 = 16;
const PIECE: u64 = 4 << 20;
const SCATTERED: u64 = 200_000;
const ZEROED: u64 = 64 << 30;
const ZERO_AT: u64 = 256 << 30;

/// Whether block `b` lies in one of the data pieces the source image starts with.
fn in_data(b: u64) -> bool {
    let offset = b * 4096 % (TIB / DATA_PIECES);
    ((1 << 20)..(1 << 20) + PIECE).contains(&offset)
}

/// The scattered blocks: distinct, spread over the whole disk, outside the zeroed range and the
/// data pieces (so that both can be checked on the destination as they were written).
fn scattered() -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < SCATTERED as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % (TIB / 4096);
        if !(ZERO_AT / 4096..(ZERO_AT + ZEROED) / 4096).contains(&b) && !in_data(b) {
            seen.insert(b);
        }
    }
    // In the order a guest would write them, not sorted.
    let mut v: Vec<u64> = seen.into_iter().collect();
    let n = v.len();
    for i in 0..n {
        v.swap(i, (i * 7919) % n);
    }
    v
}

/// The content of a scattered block: compressible, and different per block.
fn block_of(b: u64) -> Vec<u8> {
    let mut v = vec![(b % 251) as u8; 4096];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v
}

/// Sends `requests` pipelined, 64 at a time, and checks every reply.
fn pipelined(c: &mut RawClient, requests: impl Iterator<Item = (Request, Vec<u8>)>) {
    let mut in_flight = 0;
    for (req, payload) in requests {
        c.send(req, &payload).unwrap();
        in_flight += 1;
        if in_flight == 64 {
            for _ in 0..in_flight {
                assert_eq!(c.recv().unwrap().error, 0);
            }
            in_flight = 0;
        }
    }
    for _ in 0..in_flight {
        assert_eq!(c.recv().unwrap().error, 0);
    }
}

fn flush(c: &mut RawClient) {
    assert_eq!(c.call(request(Cmd::Flush, 1, 0, 0), &[]).unwrap().error, 0);
}

fn row(ctl: &mut ControlClient) -> Value {
    ctl.ok("query-row", json!({}))
}

#[test]
fn a_terabyte_disk_migrates_in_time_and_memory_that_follow_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let src_image = a.join("disk.raw");
    let dst_image = b.join("disk.raw");
    sparse_file(&src_image, TIB);
    sparse_file(&dst_image, TIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src_image).unwrap();
        for i in 0..DATA_PIECES {
            f.write_all_at(&random_bytes(i + 1, PIECE as usize), i * (TIB / DATA_PIECES) + (1 << 20)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let key = key_file(dir.path(), "scale-test-key-0123456789abcdef");
    let port = free_port();
    let src = source(&a, &src_image, &key);
    let dst = destination(&b, &dst_image, &key, port);
    let pid = src.server.proc.pid();
    let mut ctl = src.ctl();
    let mut c = RawClient::connect(&src.server.socket, "", false).unwrap();
    // The flush after the scattered writes syncs them all: a minute on a slow disk.
    c.set_read_timeout(hang_limit(SCATTERED * 4096)).unwrap();
    let mut figures: Vec<(String, String)> = Vec::new();
    let mut fig = |k: &str, v: String| {
        eprintln!("SCALE {k}: {v}");
        figures.push((k.to_string(), v));
    };

    // 200,000 scattered writes in ROW mode.
    ctl.ok("row-start", json!({}));
    let blocks = scattered();
    let rss0 = rss_kib(pid);
    let t = Instant::now();
    pipelined(
        &mut c,
        blocks.iter().enumerate().map(|(i, &b)| (request(Cmd::Write, i as u64, b * 4096, 4096), block_of(b))),
    );
    let written = t.elapsed();
    flush(&mut c);
    fig("200,000 scattered 4 KiB writes (ROW)", format!("{:.1} s", t.elapsed().as_secs_f64()));
    fig("flush after 200,000 scattered writes", format!("{:.1} s", (t.elapsed() - written).as_secs_f64()));
    let r = row(&mut ctl);
    let (updated, map_bytes) = (r["blocks-updated"].as_u64().unwrap(), r["map-bytes"].as_u64().unwrap());
    assert_eq!(updated, SCATTERED);
    let per_block = map_bytes as f64 / updated as f64;
    fig("mapping per updated block", format!("{per_block:.1} bytes ({map_bytes} bytes, {} runs)", r["map-runs"]));
    fig("source RSS growth for them", format!("{:.1} MiB", (rss_kib(pid) - rss0) as f64 / 1024.0));
    assert!(per_block <= 20.0, "{per_block:.1} bytes per updated block");

    // The migration: round 1 carries the 64 MiB allocated, round 2 the scattered blocks.
    let t = Instant::now();
    ctl.ok("migrate-start", json!({ "uri": format!("tcp:127.0.0.1:{port}") }));
    let ready = wait_phase(&mut ctl, "ready", hang_limit(SCATTERED * 4096 + DATA_PIECES * PIECE));
    fig("migrate-start -> ready", format!("{:.1} s", t.elapsed().as_secs_f64()));
    let base = &ready["rounds"][0];
    fig(
        "round 1 (base)",
        format!(
            "{} MB on the wire, {:.2} s",
            base["wire-bytes"].as_u64().unwrap() / 1_000_000,
            base["seconds"].as_f64().unwrap()
        ),
    );
    assert!(
        base["logical-bytes"].as_u64().unwrap() <= DATA_PIECES * PIECE + (1 << 20),
        "round 1 sent more than the data: {base}"
    );

    // Zeroing 64 GiB during the migration, 2 GiB per request.
    let rss1 = rss_kib(pid);
    let runs1 = row(&mut ctl)["map-runs"].as_u64().unwrap();
    let t = Instant::now();
    pipelined(
        &mut c,
        (0..ZEROED / (2 << 30)).map(|i| (request(Cmd::WriteZeroes, i, ZERO_AT + i * (2 << 30), 2 << 30), Vec::new())),
    );
    flush(&mut c);
    fig("zeroing 64 GiB (ROW)", format!("{:.2} s", t.elapsed().as_secs_f64()));
    let grown = rss_kib(pid).saturating_sub(rss1);
    let runs2 = row(&mut ctl)["map-runs"].as_u64().unwrap();
    fig("source RSS growth for it", format!("{:.2} MiB, {} more runs", grown as f64 / 1024.0, runs2 - runs1));
    assert!(grown < 5 * 1024, "zeroing 64 GiB grew the source by {grown} KiB");
    assert!(runs2 - runs1 <= 8, "zeroing 64 GiB added {} runs", runs2 - runs1);

    // The final round carries it as zero extents.
    let t = Instant::now();
    let fin = ctl.ok("migrate-finish", json!({}));
    fig("migrate-finish (the downtime)", format!("{:.0} ms", t.elapsed().as_secs_f64() * 1000.0));
    let last = fin["rounds"].as_array().unwrap().last().unwrap().clone();
    fig(
        "final round",
        format!(
            "{} bytes on the wire, {} GiB as zero extents",
            last["wire-bytes"],
            last["zero-bytes"].as_u64().unwrap() >> 30
        ),
    );
    assert!(last["zero-bytes"].as_u64().unwrap() >= ZEROED);
    assert!(
        last["wire-bytes"].as_u64().unwrap() < 1 << 20,
        "the zeroed range cost {} bytes on the wire",
        last["wire-bytes"]
    );
    fig("total bytes on the wire", format!("{} MB", fin["total-wire-bytes"].as_u64().unwrap() / 1_000_000));
    ctl.ok("migrate-complete", json!({}));
    let _ = dst.ctl();

    // The destination holds exactly what was written.
    let mut d = RawClient::connect(&dst.server.socket, "", false).unwrap();
    for i in 0..DATA_PIECES {
        let at = i * (TIB / DATA_PIECES) + (1 << 20);
        let r = d.call(request(Cmd::Read, i, at, PIECE as u32), &[]).unwrap();
        // The piece inside the zeroed range was zeroed with it.
        let want = if (ZERO_AT..ZERO_AT + ZEROED).contains(&at) {
            vec![0; PIECE as usize]
        } else {
            random_bytes(i + 1, PIECE as usize)
        };
        assert!(r.data == want, "data piece {i} differs");
    }
    for (i, &b) in blocks.iter().enumerate().step_by(7) {
        let r = d.call(request(Cmd::Read, i as u64, b * 4096, 4096), &[]).unwrap();
        assert!(r.data == block_of(b), "scattered block {b} differs");
    }
    for i in 0..64 {
        let at = ZERO_AT + i * (1 << 30) + 4096 * 17;
        let r = d.call(request(Cmd::Read, i, at, 1 << 16), &[]).unwrap();
        assert!(r.data.iter().all(|&x| x == 0), "zeroed range not zero at {at}");
    }
    drop(c);
    let rows: Vec<String> = figures.iter().map(|(k, v)| format!("| {k} | {v} |")).collect();
    println!("\n| 1 TiB disk, 64 MiB of data, row migration over loopback | |\n|---|---|\n{}", rows.join("\n"));
}
