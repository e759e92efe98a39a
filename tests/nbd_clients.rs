//! The server driven by real NBD clients: qemu-io, qemu-img, nbdcopy and nbdinfo.

use std::process::Command;

use e2e::*;

#[test]
fn qemu_io_patterns_zeroes_discard_and_map() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 64 << 20);
    let server = Server::start(dir.path(), &image, &[]);
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", &server.uri()]).args([
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 4M 64k",
        "-c",
        "write -P 0x11 8M 1M",
        "-c",
        "write -z 8M 512k",
        "-c",
        "discard 8M 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0xcd 4M 64k",
        "-c",
        "read -P 0 8M 1M",
        "-c",
        "read -P 0 16M 4k",
        "-c",
        "flush",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");

    let map = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &server.uri()]));
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let extents = map.as_array().unwrap();
    let is_data_at = |pos: u64| {
        extents.iter().find_map(|e| {
            let start = e["start"].as_u64().unwrap();
            let len = e["length"].as_u64().unwrap();
            (start <= pos && pos < start + len).then(|| e["data"].as_bool().unwrap())
        })
    };
    assert_eq!(is_data_at(0), Some(true), "{map}");
    assert_eq!(is_data_at(4 << 20), Some(true), "{map}");
    assert_eq!(is_data_at(2 << 20), Some(false), "{map}");
    assert_eq!(is_data_at(8 << 20), Some(false), "discarded range must be a hole: {map}");
    assert_eq!(is_data_at(60 << 20), Some(false), "{map}");

    // The image file itself holds exactly what the client wrote.
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(bytes[4 << 20..(4 << 20) + 65536].iter().all(|&b| b == 0xcd));
    assert!(bytes[8 << 20..9 << 20].iter().all(|&b| b == 0));
}

#[test]
fn nbdcopy_64mib_round_trip_is_byte_identical() {
    require_tool("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 64 << 20);
    let src = dir.path().join("src.bin");
    let mut data = random_bytes(42, 64 << 20);
    // A zero run in the middle exercises zero detection on the way in and holes on the way out.
    data[20 << 20..24 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    let server = Server::start(dir.path(), &image, &[]);
    run_ok(Command::new("nbdcopy").arg(&src).arg(server.uri()));
    let back = dir.path().join("back.bin");
    run_ok(Command::new("nbdcopy").arg(server.uri()).arg(&back));
    assert!(std::fs::read(&back).unwrap() == data, "data read back differs from data written");
    assert!(std::fs::read(&image).unwrap() == data, "image differs from data written");
}

#[test]
fn nbdinfo_reports_flags_and_contexts() {
    require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 16 << 20);
    let server = Server::start(dir.path(), &image, &["--export", "vm1"]);
    let out = run_ok(Command::new("nbdinfo").args(["--json", &server.uri_of("vm1")]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(info["structured"], true);
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "vm1");
    assert_eq!(export["export-size"], 16 << 20);
    for flag in
        ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache", "can_df", "can_fast_zero"]
    {
        assert_eq!(export[flag], true, "{flag} in {export}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_minimum"], 512);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 << 20);
    assert!(export["contexts"].as_array().unwrap().contains(&"base:allocation".into()), "{export}");
    // The description names the export, never a path of this host (clients may be remote).
    let description = export["description"].as_str().unwrap_or_default();
    assert!(description.contains("vm1") && !description.contains(dir.path().to_str().unwrap()), "{export}");

    // The default (empty) name reaches the same export; --list shows it.
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &server.uri()]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["exports"][0]["export-name"], "vm1");
}

#[test]
fn read_only_export_is_advertised_and_enforced() {
    require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let server = Server::start(dir.path(), &image, &["--read-only"]);
    let out = run_ok(Command::new("nbdinfo").args(["--json", &server.uri()]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    run_ok(Command::new("qemu-io").args(["-r", "-f", "raw", &server.uri(), "-c", "read -P 7 0 4k"]));
    // QEMU refuses to open a read-only export for writing at all.
    let out = Command::new("qemu-io").args(["-f", "raw", &server.uri(), "-c", "write 0 4k"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 7));
}
