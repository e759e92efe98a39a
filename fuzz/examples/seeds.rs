//! Writes the seed corpus, fuzz/seeds/TARGET/seed-* (kept in the repository; fuzzing grows its
//! own corpus in fuzz/corpus/TARGET): well-formed sessions for every target, so that fuzzing
//! starts from inputs that get past handshakes and checksums.
//! `cargo +nightly run --example seeds` from fuzz/.

use std::path::Path;

use migration_stream::{Message, RoundKind, SessionParams, Strategy};
use nbd_proto::consts::*;
use nbd_proto::option::{InfoRequest, MetaContextRequest};
use nbd_proto::{ClientFlags, ClientOption, Command, Request};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn req(out: &mut Vec<u8>, command: Command, flags: u16, offset: u64, length: u32) {
    Request { flags, command, cookie: offset ^ 0x55, offset, length }.encode(out);
    if command == Command::Write {
        out.extend(std::iter::repeat_n(0xab, length as usize));
    }
}

fn nbd_session(structured: bool, tls: bool) -> Vec<u8> {
    let mut out = Vec::new();
    ClientFlags { bits: NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES }.encode(&mut out);
    if tls {
        ClientOption::StartTls.encode(&mut out);
        return out;
    }
    ClientOption::List.encode(&mut out);
    if structured {
        ClientOption::StructuredReply.encode(&mut out);
        let meta = MetaContextRequest { export: "vm1".into(), queries: vec!["base:allocation".into()] };
        ClientOption::SetMetaContext(meta).encode(&mut out);
    }
    ClientOption::Info(InfoRequest { export: "vm1@base".into(), requests: vec![NBD_INFO_NAME] }).encode(&mut out);
    ClientOption::Go(InfoRequest { export: "".into(), requests: vec![NBD_INFO_BLOCK_SIZE] }).encode(&mut out);
    req(&mut out, Command::Write, NBD_CMD_FLAG_FUA, 512, 1024);
    req(&mut out, Command::Read, if structured { NBD_CMD_FLAG_DF } else { 0 }, 0, 4096);
    req(&mut out, Command::WriteZeroes, NBD_CMD_FLAG_NO_HOLE, 0, 512);
    req(&mut out, Command::Trim, 0, 1024, 512);
    if structured {
        req(&mut out, Command::BlockStatus, NBD_CMD_FLAG_REQ_ONE, 0, 8192);
    }
    req(&mut out, Command::Flush, 0, 0, 0);
    req(&mut out, Command::Cache, 0, 0, 4096);
    req(&mut out, Command::Read, 0, 1 << 40, 512);
    req(&mut out, Command::Disc, 0, 0, 0);
    out
}

fn frames(msgs: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out);
    }
    out
}

fn main() {
    // nbd_server: the first byte picks the disk (0x7c: 16 KiB, writable) and TLS (bit 1).
    for (name, structured) in [("simple", false), ("structured", true)] {
        let mut input = vec![0x7c];
        input.extend(nbd_session(structured, false));
        write("nbd_server", name, &input);
    }
    let mut tls = vec![0x7e];
    tls.extend(nbd_session(false, true));
    write("nbd_server", "starttls", &tls);
    let mut old = vec![0x7c];
    ClientFlags { bits: NBD_FLAG_C_FIXED_NEWSTYLE }.encode(&mut old);
    ClientOption::ExportName("vm1".into()).encode(&mut old);
    req(&mut old, Command::Read, 0, 0, 512);
    write("nbd_server", "export-name", &old);

    // The codec targets get the same bytes without the mode byte.
    write("nbd_options", "session", &nbd_session(true, false));
    let mut requests = Vec::new();
    req(&mut requests, Command::Write, 0, 0, 512);
    req(&mut requests, Command::Read, 0, 0, 512);
    req(&mut requests, Command::BlockStatus, NBD_CMD_FLAG_REQ_ONE, 0, 512);
    write("nbd_requests", "requests", &requests);

    // dest_session: what follows the handshake.
    let data = |offset: u64, fill: u8, compress: bool| Message::data(offset, &[fill; 8192], compress);
    let session = [
        Message::RoundBegin { round: 1, kind: RoundKind::Base },
        data(0, 1, false),
        data(8192, 2, true),
        Message::Zero { offset: 16384, len: 4096 },
        Message::RoundEnd { round: 1 },
        Message::Keepalive,
        Message::RoundBegin { round: 2, kind: RoundKind::Final },
        data(4096, 3, true),
        Message::RoundEnd { round: 2 },
        Message::Commit,
        Message::Done,
    ];
    write("dest_session", "committed", &frames(&session));
    write(
        "dest_session",
        "discarded",
        &frames(&[session[0].clone(), session[1].clone(), Message::Discard { reason: "x".into() }]),
    );
    write("dest_session", "revoke", &frames(&[Message::Revoke]));
    write("migration_frames", "session", &frames(&session));
    let params = SessionParams { session_id: [1; 16], disk_size: 1 << 20, block_size: 4096, strategy: Strategy::Row };
    write(
        "migration_frames",
        "handshake",
        &frames(&[
            Message::ServerHello { version: migration_stream::VERSION, nonce: [2; 32] },
            Message::ClientHello { version: migration_stream::VERSION, params, nonce: [3; 32], mac: [4; 32] },
            Message::Accept { mac: [5; 32] },
            Message::Reject { reason: "no".into() },
            Message::Error { message: "failed".into() },
            Message::Committed,
            Message::Revoked,
        ]),
    );

    // handover: a clean hand-over, a revoke after the commit, a destination that wrote first
    // (see migration_session::world for what each byte does).
    write("handover", "clean", &[0, 1, 3, 4, 5, 6, 1, 3, 14, 1, 15]);
    write("handover", "revoked", &[0, 1, 3, 4, 5, 6, 1, 8, 9, 11, 1, 3]);
    write("handover", "owner", &[0, 1, 3, 4, 5, 6, 1, 15, 8, 11, 1, 3, 16, 17, 13]);

    // control_socket: every command, as a client would send it.
    let mut lines = String::new();
    for c in control_api::catalog().0 {
        lines.push_str(&format!("{{\"execute\":\"{}\",\"id\":1}}\n", c.name));
    }
    lines.push_str("{\"execute\":\"row-start\",\"arguments\":{\"hot-threshold\":3}}\n");
    lines.push_str("{\"execute\":\"query-digest\",\"arguments\":{\"offset\":0,\"length\":4096}}\n");
    lines.push_str("{\"execute\":\"row-stop\"}\n{\"execute\":\"reclaim\",\"arguments\":{\"force\":true}}\n");
    write("control_socket", "commands", lines.as_bytes());
    println!("seeds written to {}/seeds", env!("CARGO_MANIFEST_DIR"));
}
