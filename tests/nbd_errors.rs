//! Protocol errors: each bad request gets the errno the spec asks for, the connection goes on,
//! and a broken client only ever loses its own connection.

use std::process::Command;

use e2e::*;
use nbd_proto::consts::*;
use nbd_proto::{ClientFlags, ClientOption, Command as Cmd, Greeting, OptionReplyKind, Request};

fn server_with(size: u64, extra: &[&str]) -> (tempfile::TempDir, Server, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_file(&image, size);
    let server = Server::start(dir.path(), &image, extra);
    (dir, server, image)
}

#[test]
fn libnbd_error_cases_get_the_spec_errno() {
    // python3-libnbd installs for Debian's interpreter, not for any other python3 on PATH.
    assert!(std::path::Path::new("/usr/bin/python3").exists(), "run scripts/setup");
    let (dir, rw, _) = server_with(64 << 20, &[]);
    let ro_dir = dir.path().join("ro");
    std::fs::create_dir(&ro_dir).unwrap();
    let ro_image = ro_dir.join("ro.raw");
    sparse_file(&ro_image, 1 << 20);
    let ro = Server::start(&ro_dir, &ro_image, &["--read-only"]);
    let script = repo_root().join("tests/py/nbd_errors.py");
    let out = run_ok(Command::new("/usr/bin/python3").arg(script).arg(rw.uri()).arg(ro.uri()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("all error cases gave the expected errno"), "{text}");
}

#[test]
fn unknown_command_and_flags_are_einval_and_the_connection_goes_on() {
    let (_d, server, _) = server_with(1 << 20, &[]);
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let r = c.call(request(Cmd::Unknown(42), 1, 0, 4096), &[]).unwrap();
    assert_eq!((r.cookie, r.error), (1, NBD_EINVAL));
    let r = c.call(request(Cmd::Resize, 2, 0, 0), &[]).unwrap();
    assert_eq!(r.error, NBD_EINVAL);
    let r = c.call(Request { flags: 1 << 9, ..request(Cmd::Read, 3, 0, 4096) }, &[]).unwrap();
    assert_eq!(r.error, NBD_EINVAL, "unknown flag bit");
    let r = c.call(Request { flags: NBD_CMD_FLAG_REQ_ONE, ..request(Cmd::Read, 4, 0, 4096) }, &[]).unwrap();
    assert_eq!(r.error, NBD_EINVAL, "flag valid only for another command");
    let r = c.call(request(Cmd::Read, 5, 0, 4096), &[]).unwrap();
    assert_eq!((r.error, r.data.len()), (0, 4096));
}

#[test]
fn unknown_option_gets_unsup_and_negotiation_goes_on() {
    let (_d, server, _) = server_with(1 << 20, &[]);
    let mut sock = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    use std::io::{Read, Write};
    let mut greeting = [0u8; 18];
    sock.read_exact(&mut greeting).unwrap();
    assert!(Greeting::decode(&greeting).unwrap().is_some());
    let mut out = Vec::new();
    ClientFlags { bits: NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES }.encode(&mut out);
    ClientOption::Unknown(0x1234).encode(&mut out);
    ClientOption::ExtendedHeaders.encode(&mut out);
    ClientOption::StartTls.encode(&mut out);
    ClientOption::List.encode(&mut out);
    ClientOption::Abort.encode(&mut out);
    sock.write_all(&out).unwrap();
    let mut buf = Vec::new();
    sock.set_read_timeout(Some(HANG_LIMIT)).unwrap();
    sock.read_to_end(&mut buf).unwrap(); // the server closes after ABORT's ACK
    let mut replies = Vec::new();
    let mut rest = &buf[..];
    while let Some((r, n)) = nbd_proto::OptionReply::decode(rest).unwrap() {
        replies.push(r);
        rest = &rest[n..];
    }
    let kinds: Vec<_> = replies.iter().map(|r| (r.option, &r.kind)).collect();
    assert!(matches!(kinds[0], (0x1234, OptionReplyKind::Error { code: NBD_REP_ERR_UNSUP, .. })), "{kinds:?}");
    assert!(matches!(kinds[1], (NBD_OPT_EXTENDED_HEADERS, OptionReplyKind::Error { code: NBD_REP_ERR_UNSUP, .. })));
    assert!(matches!(kinds[2], (NBD_OPT_STARTTLS, OptionReplyKind::Error { .. })));
    assert!(matches!(kinds[3], (NBD_OPT_LIST, OptionReplyKind::Server { .. })));
    assert!(matches!(kinds[4], (NBD_OPT_LIST, OptionReplyKind::Ack)));
    assert!(matches!(kinds[5], (NBD_OPT_ABORT, OptionReplyKind::Ack)));
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (_d, mut server, _) = server_with(1 << 20, &[]);
    let mut good = RawClient::connect(&server.socket, "", true).unwrap();
    let mut bad = RawClient::connect(&server.socket, "", true).unwrap();
    bad.send_raw(&[0xde; 28]).unwrap();
    assert!(bad.recv().is_err(), "the server must close a connection that lost sync");
    let r = good.call(request(Cmd::Write, 1, 0, 4096), &[9; 4096]).unwrap();
    assert_eq!(r.error, 0);
    let mut again = RawClient::connect(&server.socket, "", true).unwrap();
    let r = again.call(request(Cmd::Read, 2, 0, 4096), &[]).unwrap();
    assert_eq!(r.data, vec![9; 4096]);
    assert!(server.proc.child.try_wait().unwrap().is_none(), "server died");
    // A client that vanishes in the middle of a write payload does not hurt the server either.
    let mut cut = RawClient::connect(&server.socket, "", true).unwrap();
    let mut partial = Vec::new();
    request(Cmd::Write, 3, 0, 65536).encode(&mut partial);
    partial.extend_from_slice(&[1; 1000]);
    cut.send_raw(&partial).unwrap();
    drop(cut);
    let r = good.call(request(Cmd::Read, 4, 0, 4096), &[]).unwrap();
    assert_eq!(r.data, vec![9; 4096], "a torn write must not reach the image");
    assert_eq!(server.proc.terminate(HANG_LIMIT).code(), Some(0));
}

#[test]
fn pipelined_requests_all_get_replies_and_simple_replies_work() {
    let (_d, server, image) = server_with(8 << 20, &[]);
    for structured in [true, false] {
        let mut c = RawClient::connect(&server.socket, "", structured).unwrap();
        let n = 300u64;
        // Write, flush and read requests sent back to back without waiting.
        for i in 0..n {
            let payload = vec![(i % 251) as u8; 4096];
            c.send(request(Cmd::Write, i, i * 4096, 4096), &payload).unwrap();
            if i % 50 == 49 {
                c.send(request(Cmd::Flush, 10_000 + i, 0, 0), &[]).unwrap();
            }
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..n + n / 50 {
            let r = c.recv().unwrap();
            assert_eq!(r.error, 0, "cookie {}", r.cookie);
            assert!(seen.insert(r.cookie), "duplicate reply for {}", r.cookie);
        }
        for i in (0..n).step_by(37) {
            let r = c.call(request(Cmd::Read, 20_000 + i, i * 4096, 4096), &[]).unwrap();
            assert_eq!(r.data, vec![(i % 251) as u8; 4096], "structured={structured}");
        }
    }
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(&bytes[4096 * 7..4096 * 8], &[7u8; 4096][..]);
}

#[test]
fn block_status_and_holes_in_reads() {
    let (_d, server, _) = server_with(4 << 20, &[]);
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let r = c.call(request(Cmd::Write, 1, 1 << 20, 65536), &[3; 65536]).unwrap();
    assert_eq!(r.error, 0);
    let r = c.call(request(Cmd::BlockStatus, 2, 0, 4 << 20), &[]).unwrap();
    assert_eq!(
        r.extents,
        vec![
            (1 << 20, NBD_STATE_HOLE | NBD_STATE_ZERO),
            (65536, 0),
            ((3 << 20) - 65536, NBD_STATE_HOLE | NBD_STATE_ZERO)
        ]
    );
    let r = c.call(Request { flags: NBD_CMD_FLAG_REQ_ONE, ..request(Cmd::BlockStatus, 3, 0, 4 << 20) }, &[]).unwrap();
    assert_eq!(r.extents, vec![(1 << 20, NBD_STATE_HOLE | NBD_STATE_ZERO)]);
    // A read across hole and data comes back whole, with or without DF.
    for flags in [0, NBD_CMD_FLAG_DF] {
        let r = c.call(Request { flags, ..request(Cmd::Read, 4, (1 << 20) - 65536, 196608) }, &[]).unwrap();
        assert_eq!(r.error, 0);
        assert!(r.data[..65536].iter().all(|&b| b == 0));
        assert!(r.data[65536..131072].iter().all(|&b| b == 3));
        assert!(r.data[131072..].iter().all(|&b| b == 0));
    }
    // FAST_ZERO succeeds where zeroing is fast (a hole punch or zero range on this file system).
    let r = c
        .call(
            Request {
                flags: NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE,
                ..request(Cmd::WriteZeroes, 5, 1 << 20, 4096)
            },
            &[],
        )
        .unwrap();
    assert!(r.error == 0 || r.error == NBD_ENOTSUP, "{r:?}");
}

#[test]
fn sigterm_finishes_in_flight_requests_flushes_and_exits_zero() {
    let (_d, mut server, image) = server_with(8 << 20, &[]);
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    for i in 0..64u64 {
        c.send(request(Cmd::Write, i, i * 65536, 65536), &vec![0x77; 65536]).unwrap();
    }
    for _ in 0..64 {
        assert_eq!(c.recv().unwrap().error, 0);
    }
    let status = server.proc.terminate(HANG_LIMIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", server.proc.log_text());
    assert!(!server.socket.exists(), "socket file must be removed on exit");
    assert!(server.proc.log_text().contains("stopped cleanly"));
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[..64 * 65536].iter().all(|&b| b == 0x77));
    // Once stopped, new clients are refused.
    assert!(RawClient::connect(&server.socket, "", true).is_err());
}
