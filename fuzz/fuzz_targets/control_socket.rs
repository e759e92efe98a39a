//! The control socket: whatever a local client writes (QMP lines, any command, any arguments)
//! goes through the real QMP server and command handlers of a serving proxy (without migration
//! credentials, so no migration leaves the process). It must never panic or hang.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nbd_row_proxy::harness::Lab;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| fuzz::lab("control", 1 << 20, &["serve", "--image", "{image}", "--socket", "{dir}/nbd.sock"]))
}

fuzz_target!(|data: &[u8]| {
    let lab = lab();
    fuzz::runtime().block_on(async {
        let (client, server) = UnixStream::pair().unwrap();
        let (mut rd, mut wr) = client.into_split();
        let client = async {
            // Negotiated, so that every command reaches its handler.
            let _ = wr.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await;
            if wr.write_all(data).await.is_ok() {
                let _ = wr.write_all(b"\n").await;
            }
            let _ = wr.shutdown().await;
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            assert!(out.starts_with(b"{\"QMP\""), "no greeting");
        };
        tokio::join!(lab.control_client(server), client);
    });
});
