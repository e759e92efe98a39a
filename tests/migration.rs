//! Disk migration between two proxies: the destination ends byte-identical to the source's
//! disk at `migrate-finish` while a writer keeps writing during the pre-copy rounds, for both
//! strategies; a disk migrated there and back again is unchanged; `row` sends less update data
//! than `bitmap` on an overwrite-heavy workload.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use e2e::*;
use nbd_proto::Command as Cmd;
use serde_json::{json, Value};

const SIZE: usize = 32 << 20;
const BS: usize = 4096;

/// One proxy with its control socket.
pub struct Host {
    pub server: Server,
    pub control: PathBuf,
    pub image: PathBuf,
}

impl Host {
    fn ctl(&self) -> ControlClient {
        ControlClient::connect(&self.control)
    }
}

fn key_file(dir: &Path, content: &str) -> PathBuf {
    let path = dir.join("key");
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn source(dir: &Path, image: &Path, key: &Path) -> Host {
    let control = dir.join("control.sock");
    let server = Server::start(dir, image, &["--control", control.to_str().unwrap(), "--auth-key-file", key.to_str().unwrap()]);
    wait_for_socket(&control, Duration::from_secs(10));
    Host { server, control, image: image.to_path_buf() }
}

fn destination(dir: &Path, image: &Path, key: &Path, port: u16) -> Host {
    let control = dir.join("control.sock");
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start_with(
        dir,
        "receive",
        image,
        &["--control", control.to_str().unwrap(), "--auth-key-file", key.to_str().unwrap(), "--listen", &listen],
    );
    wait_for_socket(&control, Duration::from_secs(10));
    Host { server, control, image: image.to_path_buf() }
}

/// A fresh directory with a source image: random data with a hole in the middle.
fn source_image(dir: &Path, seed: u64) -> (PathBuf, Vec<u8>) {
    let image = dir.join("disk.raw");
    let mut data = random_bytes(seed, SIZE);
    data[8 << 20..12 << 20].fill(0);
    std::fs::write(&image, &data).unwrap();
    // Punch the zero range so the base has a real hole.
    let f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a file we own.
    unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 8 << 20, 4 << 20);
    }
    (image, data)
}

/// A writer that keeps writing through NBD and remembers what the disk must hold.
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<u8>, u64)>,
}

/// Hot-set share of writes, and how many hot blocks.
const HOT_SHARE: u64 = 85;
const HOT_BLOCKS: u64 = 64;

impl Writer {
    /// Starts writing to `socket` at about `rate` requests per second (0 = flat out): 4 KiB
    /// writes mostly to a small hot set, the rest uniform, some partial blocks, trims and zeroes.
    pub fn start(socket: &Path, model: Vec<u8>, seed: u64, rate: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let socket = socket.to_path_buf();
        let handle = std::thread::spawn(move || {
            let mut c = RawClient::connect(&socket, "", true).unwrap();
            let mut model = model;
            let mut x = seed | 1;
            let mut next = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let blocks = (SIZE / BS) as u64;
            let started = Instant::now();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                if rate > 0 {
                    let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                let block = if next(100) < HOT_SHARE { 1000 + next(HOT_BLOCKS) * 7 } else { next(blocks) };
                let off = block as usize * BS;
                let r = next(100);
                let reply = if r < 80 {
                    let data = random_bytes(next(u64::MAX), BS);
                    let reply = c.call(request(Cmd::Write, n, off as u64, BS as u32), &data).unwrap();
                    model[off..off + BS].copy_from_slice(&data);
                    reply
                } else if r < 90 {
                    let sector = next(7) as usize;
                    let len = 512 * (1 + next(7 - sector as u64) as usize);
                    let data = random_bytes(next(u64::MAX), len);
                    let start = off + sector * 512;
                    let reply = c.call(request(Cmd::Write, n, start as u64, len as u32), &data).unwrap();
                    model[start..start + len].copy_from_slice(&data);
                    reply
                } else if r < 95 {
                    let reply = c.call(request(Cmd::WriteZeroes, n, off as u64, 2 * BS as u32), &[]).unwrap();
                    model[off..off + 2 * BS].fill(0);
                    reply
                } else {
                    let reply = c.call(request(Cmd::Trim, n, off as u64, BS as u32), &[]).unwrap();
                    // A trim may leave the old data or zeroes: learn which.
                    let back = c.call(request(Cmd::Read, n, off as u64, BS as u32), &[]).unwrap();
                    model[off..off + BS].copy_from_slice(&back.data);
                    reply
                };
                assert_eq!(reply.error, 0, "write {n} failed");
                n += 1;
            }
            (model, n)
        });
        Self { stop, handle }
    }

    /// Stops (as a VM pausing does) and returns the expected disk and the request count.
    pub fn stop(self) -> (Vec<u8>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn wait_phase(ctl: &mut ControlClient, want: &str, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let status = ctl.ok("query-migrate", json!({}));
        if status["phase"] == want {
            return status;
        }
        assert!(status["phase"] != "failed", "migration failed: {status}");
        assert!(start.elapsed() < timeout, "phase {want} not reached within {timeout:?}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_all(server: &Server) -> Vec<u8> {
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let mut out = Vec::with_capacity(SIZE);
    for (i, off) in (0..SIZE).step_by(4 << 20).enumerate() {
        let r = c.call(request(Cmd::Read, i as u64, off as u64, 4 << 20), &[]).unwrap();
        assert_eq!(r.error, 0);
        out.extend_from_slice(&r.data);
    }
    out
}

/// Migrates with a writer running during the rounds; returns the final status.
fn migrate_under_load(src: &Host, dst_port: u16, strategy: &str, start_model: Vec<u8>, seed: u64) -> (Value, Vec<u8>) {
    let writer = Writer::start(&src.server.socket, start_model, seed, 1500);
    std::thread::sleep(Duration::from_millis(300));
    let mut ctl = src.ctl();
    ctl.ok(
        "migrate-start",
        json!({"uri": format!("tcp:127.0.0.1:{dst_port}"), "strategy": strategy, "max-bandwidth": 40 << 20}),
    );
    wait_phase(&mut ctl, "ready", Duration::from_secs(120));
    // Keep writing a little while pre-copy is done, as a VM would until it pauses.
    std::thread::sleep(Duration::from_millis(300));
    let (model, writes) = writer.stop();
    assert!(writes > 200, "the writer should have been busy during the rounds ({writes} writes)");
    let finished = ctl.ok("migrate-finish", json!({}));
    assert_eq!(finished["phase"], "completed", "{finished}");
    (finished, model)
}

#[test]
fn destination_matches_the_source_for_both_strategies() {
    for (i, strategy) in ["row", "bitmap"].into_iter().enumerate() {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let key = key_file(src_dir.path(), "0123456789abcdef0123456789abcdef\n");
        let (image, data) = source_image(src_dir.path(), 11 + i as u64);
        let src = source(src_dir.path(), &image, &key);
        let dst_image = dst_dir.path().join("disk.raw");
        sparse_file(&dst_image, SIZE as u64);
        let port = free_port();
        let dst = destination(dst_dir.path(), &dst_image, &key, port);
        let (status, model) = migrate_under_load(&src, port, strategy, data, 5 + i as u64);
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
        // row: base, cold updates, final; bitmap: three pre-copy rounds and the final one.
        assert_eq!(rounds.len(), if strategy == "row" { 3 } else { 4 }, "{status}");
        assert_eq!(rounds.last().unwrap()["kind"], "final");
    }
}

#[test]
fn a_disk_migrated_there_and_back_is_unchanged() {
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

/// A deterministic overwrite-heavy workload, the same for both strategies: the writer rewrites
/// a hot set while round 1 is slowed down by a bandwidth cap.
fn update_bytes(strategy: &str) -> (u64, u64) {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let key = key_file(src_dir.path(), "0123456789abcdef0123456789abcdef");
    let (image, data) = source_image(src_dir.path(), 31);
    let src = source(src_dir.path(), &image, &key);
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let _dst = destination(dst_dir.path(), &dst_image, &key, port);
    let (status, model) = migrate_under_load(&src, port, strategy, data, 77);
    assert!(std::fs::read(&dst_image).unwrap() == model);
    (status["update-logical-bytes"].as_u64().unwrap(), status["update-wire-bytes"].as_u64().unwrap())
}

#[test]
fn row_sends_less_update_data_than_bitmap_on_an_overwrite_heavy_workload() {
    let (row_logical, row_wire) = update_bytes("row");
    let (bitmap_logical, bitmap_wire) = update_bytes("bitmap");
    eprintln!("update data after round 1: row {row_logical} B logical / {row_wire} B wire; bitmap {bitmap_logical} / {bitmap_wire}");
    assert!(row_wire < bitmap_wire, "row {row_wire} vs bitmap {bitmap_wire}");
    assert!(row_logical < bitmap_logical, "row {row_logical} vs bitmap {bitmap_logical}");
}
