//! A destination's migration session: after a valid handshake (as an `--insecure` source makes
//! it), whatever frames follow go through the real receiving code into a real image. It must never
//! panic or hang, and it serves the disk only once committed.
#![no_main]

use control_api::IncomingPhase;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use migration_stream::{Message, SessionParams, Strategy};
use nbd_row_proxy::harness::Lab;
use nbd_row_proxy::ownership::Access;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 256 << 10;

fn fresh() -> Lab {
    fuzz::lab(
        "dest",
        SIZE,
        &["receive", "--image", "{image}", "--socket", "{dir}/nbd.sock", "--listen", "127.0.0.1:1", "--insecure"],
    )
}

/// The destination of the previous input, while it is still waiting for a session (a new one
/// begins by resetting the image, so nothing of the last input carries over); else a fresh one.
fn destination() -> std::sync::MutexGuard<'static, Option<Lab>> {
    static LAB: Mutex<Option<Lab>> = Mutex::new(None);
    let mut lab = LAB.lock().unwrap();
    let waiting = lab.as_ref().is_some_and(|l| l.control.incoming.as_ref().unwrap().phase() == IncomingPhase::Waiting);
    if !waiting {
        *lab = None;
        *lab = Some(fresh());
    }
    lab
}

fuzz_target!(|data: &[u8]| {
    let guard = destination();
    let lab = guard.as_ref().unwrap();
    let mut input = Vec::new();
    let params = SessionParams { session_id: [5; 16], disk_size: SIZE, block_size: 4096, strategy: Strategy::Row };
    Message::ClientHello { version: migration_stream::VERSION, params, nonce: [1; 32], mac: [0; 32] }
        .encode(&mut input);
    input.extend_from_slice(data);
    fuzz::runtime().block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (mut rd, mut wr) = tokio::io::split(client);
        let source = async {
            if wr.write_all(&input).await.is_ok() {
                let _ = wr.shutdown().await;
            }
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
        };
        let _ = tokio::join!(lab.incoming(server), source);
    });
    let phase = lab.control.incoming.as_ref().unwrap().phase();
    let access = lab.control.proxy.gate.access();
    let committed = matches!(phase, IncomingPhase::Committed | IncomingPhase::Owner);
    assert_eq!(committed, access != Access::Incoming, "phase {phase} but access {access:?}");
});
