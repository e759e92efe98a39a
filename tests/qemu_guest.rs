//! A QEMU TCG guest boots with its disk on nbd-row-proxy and writes through it with O_DIRECT.

use e2e::*;

#[test]
fn guest_writes_pattern_with_o_direct_and_host_finds_it_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 64 << 20);
    let server = Server::start(dir.path(), &image, &[]);
    let console = dir.path().join("console.log");
    let mut guest = start_guest(&server.uri(), "write-pattern", &console);
    let status = guest.wait_or_kill(HANG_LIMIT);
    let text = guest.log_text();
    assert!(status.success(), "qemu exited with {status}; console:\n{text}");
    assert!(text.contains("GUEST-READY"), "console:\n{text}");
    assert!(text.contains("PATTERN-WRITTEN"), "console:\n{text}");
    assert!(text.contains("PATTERN-VERIFIED"), "console:\n{text}");
    // The guest wrote 16 blocks of 4 KiB at 1 MiB + i*4096, block i filled with 'A' + i.
    let bytes = std::fs::read(&image).unwrap();
    for i in 0..16usize {
        let start = (1 << 20) + i * 4096;
        assert!(bytes[start..start + 4096].iter().all(|&b| b == b'A' + i as u8), "block {i} on the host");
    }
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0), "nothing else was written");
    let log = server.proc.log_text();
    assert!(log.contains("connection open") && log.contains("connection closed"), "server log:\n{log}");
}
